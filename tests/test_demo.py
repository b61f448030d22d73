"""The demo as a person runs it (quick mode): data from skimage, every demo option file, a short
output with an ETA, the table, the crops picture, and BasicSR's full log in each experiment folder."""
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from krbench import demo  # tools/ (tests/conftest.py)
from krdistill.evaluation import bicubic_upscale, load_pairs

OPTIONS = Path(__file__).resolve().parents[1] / 'options' / 'demo'


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """``tools/demo.py --root <tmp> --total-iter 2``, once for the module: (root, lines printed on
    stdout and stderr)."""
    root = tmp_path_factory.mktemp('demo')
    mp = pytest.MonkeyPatch()
    out = io.StringIO()
    mp.setattr('sys.stdout', out)
    mp.setattr('sys.stderr', out)  # BasicSR's console handler writes to stderr
    try:
        demo.main(['--root', str(root), '--total-iter', '2'])
    finally:
        mp.undo()
    return root, out.getvalue().splitlines()


def _cell(picture, row, col):
    """The crop part (under the label band) of one cell of the crops picture."""
    cell = demo.CROP_SIZE * demo.CROP_ZOOM
    y0 = row * (demo.LABEL_HEIGHT + cell + demo.CROP_GAP) + demo.LABEL_HEIGHT
    x0 = col * (cell + demo.CROP_GAP)
    return picture[y0:y0 + cell, x0:x0 + cell]


def test_demo_prints_little_with_an_eta_the_table_and_where_the_picture_is(quick):
    root, lines = quick
    assert len(lines) < 40, '\n'.join(lines)
    text = '\n'.join(lines)
    assert 'ETA' in text
    assert str(root / demo.CROPS_PNG) in text
    assert 'EDSR(' not in text and 'INFO:' not in text  # BasicSR's log stays in the log files
    n_stages = len(demo.RUNS) + 2
    assert lines[0].startswith(f'[demo 1/{n_stages}] data:')
    for i, (label, _) in enumerate(demo.RUNS, 2):
        assert any(line.startswith(f'[demo {i}/{n_stages}] {label}: 2 iterations in') for line in lines), text
    assert any(line.startswith(f'[demo {n_stages}/{n_stages}] evaluation:') for line in lines)
    table = [line for line in lines if line.startswith('| ')]
    assert len(table) == 1 + 1 + len(demo.RUNS)  # header, bicubic, every run
    assert 'Total time' in lines[-1]


def test_demo_results_and_table(quick):
    root, _ = quick
    results = json.loads((root / demo.RESULTS_DIR / 'demo_results.json').read_text())
    assert list(results) == ['bicubic'] + [label for label, _ in demo.RUNS]
    for label, res in results.items():
        assert len(res['images']) == len(demo.TEST_IMAGES)
        assert 5 < res['psnr'] < 60 and 0 < res['ssim'] <= 1, label
    # student rows share the student's size; the teacher is bigger
    assert results['student alone']['params'] == results['KD (output)']['params'] == results['MetaKD']['params']
    assert results['student alone']['params'] < results['teacher']['params']
    table = demo.table(results)
    assert table.count('\n') == len(results) + 1 and 'student alone' in table


def test_each_experiment_folder_holds_basicsrs_full_log(quick):
    root, _ = quick
    for _, name in demo.RUNS:
        logs = list((root / 'experiments' / name).glob(f'train_{name}_*.log'))
        assert len(logs) == 1, name
        log = logs[0].read_text()
        assert 'Network [EDSR] is created.' in log and 'EDSR(' in log, name  # the structure dump
        assert 'Start training from epoch' in log and 'iter:       2' in log, name
        assert 'End of training' in log, name
    meta_log = next((root / 'experiments' / 'demo_metakd_x2').glob('train_*.log')).read_text()
    assert 'kd: auto chose 1 distillation point(s)' in meta_log and 'body.3' in meta_log
    assert list((root / 'tb_logger' / 'demo_metakd_x2').glob('events.out.tfevents.*'))  # use_tb_logger: true


def test_crops_picture_is_aligned_and_labelled(quick):
    root, _ = quick
    picture = cv2.imread(str(root / demo.CROPS_PNG))
    assert picture is not None
    cell = demo.CROP_SIZE * demo.CROP_ZOOM
    columns = [c for c in demo.CROP_COLUMNS if c in ('HR', 'bicubic') or c in dict(demo.RUNS)]
    assert len(columns) == 2 + len(demo.RUNS)
    assert picture.shape == (len(demo.CROP_IMAGES) * (demo.LABEL_HEIGHT + cell + demo.CROP_GAP),
                             len(columns) * (cell + demo.CROP_GAP), 3)
    base = root / 'datasets' / 'krdistill_demo' / 'test'
    pairs = {p['name']: p for p in load_pairs(base / 'HR', demo.SCALE, base / f'LRbicx{demo.SCALE}')}
    s = demo.CROP_SIZE
    for row, name in enumerate(demo.CROP_IMAGES):
        hr = pairs[name]['hr']
        y, x = demo.crop_box(hr)
        zoom = np.ones((demo.CROP_ZOOM, demo.CROP_ZOOM, 1), np.uint8)
        # the HR and bicubic cells are those images at the same HR coordinates
        np.testing.assert_array_equal(_cell(picture, row, 0), np.kron(hr[y:y + s, x:x + s], zoom))
        bic = bicubic_upscale(pairs[name]['lr'], demo.SCALE)[y:y + s, x:x + s]
        np.testing.assert_array_equal(_cell(picture, row, 1), np.kron(bic, zoom))
        # every label band has text on it
        y0 = row * (demo.LABEL_HEIGHT + cell + demo.CROP_GAP)
        for col in range(len(columns)):
            band = picture[y0:y0 + demo.LABEL_HEIGHT, col * (cell + demo.CROP_GAP):][:, :cell]
            assert (band > 200).sum() > 50, (name, columns[col])


def test_crop_box_picks_the_textured_window():
    img = np.full((200, 300, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    img[120:184, 30:94] = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # the only texture
    assert demo.crop_box(img, 64) == (120, 30)
    with pytest.raises(ValueError, match='too small'):
        demo.crop_box(img[:60], 64)


def test_verbose_prints_basicsrs_log_and_finished_runs_are_reused(tmp_path, capsys):
    options = tmp_path / 'options'
    options.mkdir()
    shutil.copy(OPTIONS / 'demo_student_x2.yml', options)  # the fastest run only
    demo.main(['--root', str(tmp_path), '--options', str(options), '--total-iter', '2', '--verbose'])
    captured = capsys.readouterr()
    verbose = captured.out + captured.err
    assert 'Network [EDSR] is created.' in verbose and 'EDSR(' in verbose and 'Start training' in verbose
    assert len(verbose.splitlines()) > 100
    first = json.loads((tmp_path / demo.RESULTS_DIR / 'demo_results.json').read_text())
    lines = []
    again = demo.run(tmp_path, options, total_iter=2, log=lines.append)
    assert any('student alone: trained before, reusing' in line for line in lines), lines
    assert again['student alone']['psnr'] == first['student alone']['psnr']
    picture = cv2.imread(str(tmp_path / demo.CROPS_PNG))
    assert picture.shape[1] == 3 * (demo.CROP_SIZE * demo.CROP_ZOOM + demo.CROP_GAP)  # HR, bicubic, student


def test_console_rewrites_a_status_line_on_a_terminal_and_writes_sparse_lines_otherwise():
    tty = io.StringIO()
    console = demo.Console(tty, tty=True)
    progress = demo._TrainingProgress(console, '[demo 2/4] student alone', 800)
    progress.log_line('2026-01-01 00:00:00,000 INFO: Start training from epoch: 0, iter: 0')
    for it in range(100, 900, 100):
        progress.log_line(f'2026-01-01 INFO: [demo_..][epoch:  1, iter:{it:8,d}, lr:(1.000e-03,)] [eta: 0:00:10]')
    console.line('[demo 2/4] student alone: 800 iterations in 10 s')
    out = tty.getvalue()
    assert out.count('\n') == 1 and out.endswith('\n')
    assert out.count('\r') >= 9 and 'iter 400/800' in out and 'ETA' in out

    plain = io.StringIO()
    console = demo.Console(plain, tty=False)
    progress = demo._TrainingProgress(console, '[demo 2/4] student alone', 800)
    progress.log_line('2026-01-01 INFO: Start training from epoch: 0, iter: 0')
    for it in range(100, 900, 100):
        progress.log_line(f'2026-01-01 INFO: [demo_..][epoch:  1, iter:{it:8,d}, lr:(1.000e-03,)] [eta: 0:00:10]')
    lines = plain.getvalue().splitlines()
    assert '\r' not in plain.getvalue()
    assert [line.split('iter ')[1].split(',')[0] for line in lines] == ['200/800', '400/800', '600/800']
    assert all('ETA' in line for line in lines)

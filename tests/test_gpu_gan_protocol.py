"""The GPU GAN-KD protocol (tools/gpu_gan_protocol.py) on the CPU with tiny settings: pack, then the
whole run (smoke and iteration clock, plan, the Real-ESRGAN-pipeline protocol, the output files), so
that the GPU run works the first time. BasicSR's Real-ESRGAN models call ``.cuda()``: stubbed here
(``helpers.stub_cuda``), as in tests/test_gan_kd.py."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from helpers import stub_cuda, synthetic_image, write_pairs
import gpu_gan_protocol as ggp  # tools/ (tests/conftest.py)
from krdistill import evaluation as ev

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / 'options/bench/gpu_gan_x4.yml'
TINY_NET = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4, res_scale=1,
                img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])


def tiny_protocol(tmp: Path) -> Path:
    """The shipped GPU config with tiny data, networks and targets (4 iterations a stage, 2 seeds)."""
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg['data'] = dict(train_hr=['Train/HR'], exclude=[], test={'tiny': dict(hr='Test/HR', lr='Test/LR')}, crops='tiny')
    cfg['pool'] = dict(gt_size=32, workers=0)
    cfg['teacher']['network'] = dict(TINY_NET)
    cfg['student']['network'] = dict(TINY_NET, num_block=1)
    cfg['gan']['network_d'] = dict(cfg['gan']['network_d'], num_feat=4)
    cfg['kd'] = dict(teacher_layers=['body.1'], student_layers=['body.0'])
    for stage in (cfg['teacher']['l1'], cfg['teacher']['gan'], cfg['train']['l1'], cfg['train']['gan']):
        stage.update(iters=4, batch=2)
    cfg['degradation']['queue_batches'] = 2
    cfg['train']['seeds'] = [0, 1]
    cfg['gpu'].update(deadline_s=10 ** 6, step=2, floor_iters=2, workers=2,
                      smoke=dict(iters=4, seeds=[0], tests=1, train_images=2),
                      source=dict(folders=['Train/HR', 'Test/HR', 'Test/LR', 'Skip/HR'], exclude=['Train/HR/im3.png']))
    path = tmp / 'gpu_gan_tiny.yml'
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope='module')
def gpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('gpugan')
    rng = np.random.default_rng(0)
    for folder, n in (('Train/HR', 4), ('Skip/HR', 1)):
        (tmp / 'data' / folder).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp / 'data' / folder / f'im{i}.png'), synthetic_image(96, rng))
    write_pairs(tmp / 'data' / 'Test', n=1, size=384, scale=4)  # NIQE needs several 96-px blocks
    torch.manual_seed(0)
    torch.save({'params': ev.build_network(dict(TINY_NET)).state_dict()}, tmp / 'teacher.pth')
    config = tiny_protocol(tmp)
    man = ggp.pack(tmp / 'data', tmp / 'teacher.pth', None, tmp / 'pack', str(config))
    mp = pytest.MonkeyPatch()
    try:
        stub_cuda(mp)
        mp.chdir(tmp)  # relative paths, as on the GPU machine (--pack .gpu)
        res = ggp.run(Path('pack'), Path('OUT'), 'cpu', str(config))
    finally:
        mp.undo()
    return dict(tmp=tmp, config=config, man=man, res=res, out=tmp / 'OUT', work=tmp / 'OUT_work')


def test_pack_writes_webp_and_the_teacher(gpu_run):
    man, pack = gpu_run['man'], gpu_run['tmp'] / 'pack'
    assert man['images'] == 3 + 1 + 1 + 1 and man['teacher'] == 'teacher.pth'  # Train/HR/im3.png left out
    assert sorted(p.name for p in (pack / 'data' / 'Train' / 'HR').iterdir()) == ['im0.webp', 'im1.webp', 'im2.webp']
    assert np.array_equal(cv2.imread(str(pack / 'data' / 'Test' / 'HR' / 'img000.webp')),
                          cv2.imread(str(gpu_run['tmp'] / 'data' / 'Test' / 'HR' / 'img000.png')))  # lossless


def test_run_writes_at_most_8_files_with_every_row_scored(gpu_run):
    out, res = gpu_run['out'], gpu_run['res']
    assert sorted(p.name for p in out.iterdir()) == sorted(ggp.OUT_FILES) and len(ggp.OUT_FILES) <= 8
    saved = json.loads((out / 'gan_gpu_results.json').read_text())
    rows = saved['results']['rows']
    assert set(rows) == {'student_alone', 'output_kd', 'fitnet_out'}
    for method, per_set in rows.items():
        assert len(per_set['tiny']) == 2  # two seeds
        for scores in per_set['tiny']:
            for key in ('psnr', 'ssim', 'niqe', 'psnr_to_teacher'):
                assert np.isfinite(scores[key]), (method, key)
    assert {'smoke_s', 'run_s', 'total_s'} <= set(saved['timing']) and saved['timing']['total_s'] > 0
    table = (out / 'gan_gpu_results.md').read_text()
    for col in ('PSNR-Y', 'SSIM-Y', 'NIQE', 'PSNR to teacher', 'ΔPSNR vs student_alone', 'seeds needed'):
        assert col in table
    assert 'Real-ESRGAN' in table and res['plan']['iters'] == dict(teacher_l1=4, teacher_gan=4, student_l1=4,
                                                                    student_gan=4)  # no deadline pressure
    crops = cv2.imread(str(out / 'gan_crops.png'))
    assert crops is not None and crops.shape[1] == 5 * (96 * 3 + 8)  # HR, teacher, three rows
    w = torch.load(out / 'gan_gpu_weights.pth', weights_only=True)
    assert set(w['weights']) == {'teacher_gan'} | {f'{m}_s{s}' for m in rows for s in (0, 1)}
    net = ev.build_network(dict(w['student']))
    net.load_state_dict(w['weights']['output_kd_s1'])


def test_stages_use_the_real_esrgan_models(gpu_run):
    opts = {p.stem: yaml.safe_load(p.read_text()) for p in (gpu_run['work'] / 'run' / 'options').glob('*.yml')}
    assert opts['teacher_l1']['model_type'] == 'RealESRNetModel_basicsr'
    assert opts['teacher_l1']['path']['pretrain_network_g'].endswith('teacher.pth')  # the packed teacher, fine-tuned
    assert opts['teacher_gan']['model_type'] == 'RealESRGANModel_basicsr'
    assert opts['student_l1_s0']['model_type'] == 'RealESRNetModel_basicsr'
    assert opts['student_alone_s1']['model_type'] == 'RealESRGANModel_basicsr' and 'network_t' not in opts['student_alone_s1']
    for m in ('output_kd_s0', 'fitnet_out_s1'):
        assert opts[m]['model_type'] == 'KDRealESRGANModel'
        assert 'teacher_gan' in opts[m]['path']['pretrain_network_t']
    assert 'kd_opt' in opts['fitnet_out_s1']['train'] and 'kd_opt' not in opts['output_kd_s0']['train']
    o = opts['output_kd_s0']
    assert o['datasets']['train']['type'] == 'RealESRGANDataset_basicsr' and o['num_gpu'] == 0
    assert o['queue_size'] == 2 * 2 and o['gt_size'] == 32 and o['jpeg_range2'] == [30, 95] and o['l1_gt_usm']
    assert o['train']['total_iter'] == 4


def test_smoke_times_every_stage_kind(gpu_run):
    calib = gpu_run['res']['calibration']
    assert set(calib) == {'teacher_l1', 'teacher_gan', 'student_l1', 'student_alone', 'output_kd', 'fitnet_out'}
    assert all(v['s_per_iter'] > 0 and v['fixed_s'] >= 0 for v in calib.values())
    assert set(gpu_run['res']['smoke_stage_s']) == {'teacher_l1', 'teacher_gan', 'student_l1_s0', 'student_alone_s0',
                                                    'output_kd_s0', 'fitnet_out_s0'}


def _cfg():
    return dict(teacher=dict(l1=dict(iters=1000), gan=dict(iters=1000)), train=dict(l1=dict(iters=2000),
                gan=dict(iters=2000), seeds=[0, 1, 2]), methods=dict(a={}, b={}),
                gpu=dict(step=50, floor_iters=50, safety=1.0, min_fraction=0.25))


CALIB = {k: dict(s_per_iter=0.01, fixed_s=2.0) for k in ('teacher_l1', 'teacher_gan', 'student_l1', 'a', 'b')}


def test_plan_fits_the_deadline():
    cfg = _cfg()
    # fixed: (1 + 1 + 3 + 3 + 3) x 2 s = 22 s; all targets: (1000 + 1000 + 3 x 2000 x 3) x 0.01 s = 200 s
    full = ggp.plan_iters(cfg, CALIB, 1000)
    assert full['iters'] == dict(teacher_l1=1000, teacher_gan=1000, student_l1=2000, student_gan=2000)
    assert full['fraction'] == 1.0 and not full['below_target']
    half = ggp.plan_iters(cfg, CALIB, 22 + 100)
    assert half['iters'] == dict(teacher_l1=500, teacher_gan=500, student_l1=1000, student_gan=1000)
    assert half['predicted_s'] <= 122 + 1e-9
    short = ggp.plan_iters(cfg, CALIB, 22 + 30)  # less time, fewer iterations, flagged
    assert short['iters']['student_gan'] == 300 and short['below_target'] and short['predicted_s'] <= 52 + 1e-9
    slow = dict(CALIB, b=dict(s_per_iter=0.05, fixed_s=2.0))  # a slower row leaves fewer iterations to all
    assert ggp.plan_iters(cfg, slow, 122)['iters']['student_gan'] < half['iters']['student_gan']
    assert ggp.plan_iters(cfg, CALIB, 5)['iters'] == dict.fromkeys(full['iters'], 50)  # never below the floor


def test_calibrate_from_clock_stamps():
    stamps = {'teacher_l1': [0.0, 1.0, 1.1, 1.2, 1.3], 'output_kd_s0': [0.0, 0.5, 0.7, 0.9, 1.1]}
    calib = ggp.calibrate({'teacher_l1': 3.0, 'output_kd_s0': 2.0}, stamps, iters=5, skip=1)
    assert calib['teacher_l1']['s_per_iter'] == pytest.approx(0.1)  # the first (warm-up) difference left out
    assert calib['teacher_l1']['fixed_s'] == pytest.approx(2.5)
    assert calib['output_kd']['s_per_iter'] == pytest.approx(0.2) and calib['output_kd']['fixed_s'] == pytest.approx(1.0)


def test_shipped_config_runs_the_cpu_rows_with_real_esrgan(tmp_path):
    cfg = ggp.load_protocol(SHIPPED)
    cpu = yaml.safe_load((ROOT / 'options/bench/cpu_gan_x4.yml').read_text())
    assert cfg['pipeline'] == 'realesrgan' and cfg['teacher']['low_gain'] == 'warn'
    for key in ('student', 'kd', 'methods', 'gan', 'scale'):
        assert cfg[key] == cpu[key], key
    assert cfg['teacher']['network'] == cpu['teacher']['network'] and 2 <= len(cfg['train']['seeds']) <= 3
    from krdistill.models.gan_kd_model import DEGRADATION_KEYS
    assert set(DEGRADATION_KEYS) - {'gt_size'} <= set(cfg['degradation']['model'])
    assert cfg['gpu']['deadline_s'] <= 345
    for edit, match in ((dict(pipeline='realesrnet'), 'pipeline'), (dict(degradation={}), 'degradation.model'),
                        (dict(gpu={'deadline_s': 345}), 'gpu.smoke')):
        bad = dict(yaml.safe_load(SHIPPED.read_text()), **edit)
        (tmp_path / 'bad.yml').write_text(yaml.safe_dump(bad))
        with pytest.raises(KeyError, match=match):
            ggp.load_protocol(tmp_path / 'bad.yml')


def test_cpu_command_line_refuses_the_real_esrgan_pipeline(tmp_path):
    import gan_protocol
    with pytest.raises(SystemExit, match=r'call .*\.cuda\(\): use --device cuda'):
        gan_protocol.main(['-opt', str(SHIPPED), '--data-root', str(tmp_path), '--out', str(tmp_path / 'o')])
    assert not (tmp_path / 'o').exists()  # refused before anything was written


@pytest.mark.parametrize('cmd', [['pack', '--help'], ['run', '--help']])
def test_cli(cmd):
    r = subprocess.run([sys.executable, str(ROOT / 'tools/gpu_gan_protocol.py')] + cmd, capture_output=True, text=True)
    assert r.returncode == 0 and ('--pack' if cmd[0] == 'run' else '--data-root') in r.stdout


def test_a_failed_run_still_returns_the_plan(tmp_path, monkeypatch):
    """A stage that fails after the smoke: the error is raised, and gan_gpu_results.json holds the
    plan, the calibration and the error (what comes back from a GPU run that broke)."""
    config = tiny_protocol(tmp_path)
    write_pairs(tmp_path / 'pack' / 'data' / 'Test', n=1, size=64, scale=4)
    names = ['teacher_l1', 'teacher_gan', 'student_l1_s0', 'student_alone_s0', 'output_kd_s0', 'fitnet_out_s0']
    calls = []

    def fake_run(cfg, data_root, out, teacher, smoke, **kw):
        calls.append(smoke)
        if smoke:
            return dict(timing=dict(stages=dict.fromkeys(names, 1.0), score_s=1.0, scored=5))
        raise RuntimeError('stage fitnet_out_s1 broke')
    monkeypatch.setattr(ggp.gan, 'run', fake_run)
    with pytest.raises(RuntimeError, match='fitnet_out_s1 broke'):
        ggp.run(tmp_path / 'pack', tmp_path / 'OUT', 'cpu', str(config))
    saved = json.loads((tmp_path / 'OUT' / 'gan_gpu_results.json').read_text())
    assert len(calls) == 2 and 'fitnet_out_s1 broke' in saved['error']
    assert saved['plan']['iters']['student_gan'] == 4 and set(saved['calibration']) >= {'teacher_l1', 'fitnet_out'}

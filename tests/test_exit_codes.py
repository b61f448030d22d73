"""Exit codes tell the truth: every console script and every tool exits 0 on success and non-zero on
failure, run as a user runs it: in a subprocess (issue 28, principle 6)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_S, TINY_T, save_teacher, tiny_opt, write_pairs, write_yaml

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))


def _console_scripts() -> dict[str, str]:
    """name -> 'module:function' of every console script setup.py declares."""
    text = (REPO / 'setup.py').read_text()
    found = dict(re.findall(r"'([\w-]+)=([\w.]+:\w+)'", text))
    assert {'krdistill-train', 'krdistill-test', 'krdistill-evaluate'} <= set(found), found
    return found


SCRIPTS = _console_scripts()
TOOLS = sorted(p.name for p in (REPO / 'tools').glob('*.py'))


def _script(name: str, *args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """The console script ``name`` as pip's wrapper runs it: ``sys.exit(function())``."""
    module, func = SCRIPTS[name].split(':')
    code = f'import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())'
    return subprocess.run([sys.executable, '-c', code, *args], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _tool(name: str, *args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'tools' / name), *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _all(calls):
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: c[0](*c[1:]), calls))


# ------------------------------------------------------------------ every script and tool: --help, a usage error
def _autoload(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', '_krdistill_autoload', *args], cwd=REPO, capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_every_console_script_and_tool_exits_0_on_help():
    """``--help`` of every console script, every ``tools/*.py`` and ``python -m _krdistill_autoload``
    exits 0 with a usage text; a usage error of each console script exits non-zero. (A real run of
    each is too heavy for a test; the real successes and failures of train, test, evaluate and
    export are below.)"""
    calls = [(_script, n, '--help') for n in SCRIPTS] + [(_tool, t, '--help') for t in TOOLS]
    calls += [(_autoload, '--help'), (_autoload, 'no-such-action')]
    calls += [(_script, n, '--no-such-option') for n in SCRIPTS]
    for call, out in zip(calls, _all(calls)):
        what = ' '.join(map(str, call[1:]))
        if call[-1] == '--help':
            assert out.returncode == 0, (what, out.stderr[-2000:])
            assert 'usage' in out.stdout.lower(), (what, out.stdout[-500:])
        else:
            assert out.returncode == 2 and 'usage' in out.stderr.lower(), (what, out.returncode, out.stderr[-500:])


# ------------------------------------------------------------------ krdistill-evaluate
@pytest.fixture(scope='module')
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('evaluate')
    hr, _ = write_pairs(root / 'data', n=2, size=32, scale=2)
    good = save_teacher(root / 'good.pth', TINY_S)
    bad = save_teacher(root / 'nan.pth', TINY_S)
    ckpt = torch.load(bad, weights_only=True)
    ckpt['params']['conv_last.weight'].view(-1)[0] = float('nan')
    torch.save(ckpt, bad)
    opt = root / 'student.yml'
    opt.write_text(yaml.safe_dump({'network_g': TINY_S}))
    return root, hr, good, bad, opt


def test_krdistill_evaluate_success_exits_0_with_the_table_on_stdout(eval_data):
    root, hr, good, _, opt = eval_data
    out = _script('krdistill-evaluate', str(good), '-opt', str(opt), '--hr-dir', str(hr), '--scale', '2', '--bicubic',
                  '--json', str(root / 'res.json'), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '| good | 2 |' in out.stdout and '| bicubic | 2 |' in out.stdout
    assert "{'" not in out.stderr and 'images' not in out.stderr  # no result dict printed as an exit message
    assert (root / 'res.json').is_file()


@pytest.mark.parametrize('case', ['non-finite checkpoint', 'missing checkpoint', 'no images', 'truncated checkpoint'])
def test_krdistill_evaluate_failure_exits_1_naming_the_file(eval_data, case):
    root, hr, good, bad, opt = eval_data
    ck, hr_dir, words = {
        'non-finite checkpoint': (bad, hr, ['nan.pth', 'params.conv_last.weight (1 NaN of']),
        'missing checkpoint': (root / 'absent.pth', hr, ['checkpoint: no such file or folder', 'absent.pth']),
        'no images': (good, root, ['no images in']),
        'truncated checkpoint': (root / 'cut.pth', hr, ['cut.pth', 'truncated']),
    }[case]
    if case == 'truncated checkpoint':
        ck.write_bytes(good.read_bytes()[:500])
    out = _script('krdistill-evaluate', str(ck), '-opt', str(opt), '--hr-dir', str(hr_dir), '--scale', '2', cwd=root)
    assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
    assert out.stderr.startswith('krdistill-evaluate: error: ') and 'Traceback' not in out.stderr, out.stderr[-3000:]
    for w in words:
        assert w in out.stderr, (w, out.stderr)
    assert '| ' not in out.stdout  # nothing scored


def test_tools_evaluate_py_exits_like_the_console_script(eval_data):
    root, hr, good, bad, opt = eval_data
    ok = _tool('evaluate.py', str(good), '-opt', str(opt), '--hr-dir', str(hr), '--scale', '2', cwd=root)
    fail = _tool('evaluate.py', str(bad), '-opt', str(opt), '--hr-dir', str(hr), '--scale', '2', cwd=root)
    assert ok.returncode == 0 and '| good |' in ok.stdout, ok.stderr[-2000:]
    assert fail.returncode == 1 and 'non-finite' in fail.stderr, fail.stderr[-2000:]


# ------------------------------------------------------------------ tools/export_student.py
def test_export_success_exits_0_and_failure_exits_1(tmp_path):
    models = tmp_path / 'experiments' / 'run' / 'models'
    models.mkdir(parents=True)
    save_teacher(models / 'net_g_10.pth', TINY_S)
    opt = tmp_path / 'student.yml'
    opt.write_text(yaml.safe_dump({'network_g': TINY_S}))
    ok = _tool('export_student.py', str(tmp_path / 'experiments' / 'run'), '-o', str(tmp_path / 'student.pth'),
               '--opt', str(opt), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert 'Verified' in ok.stdout and (tmp_path / 'student.pth').is_file()

    ckpt = torch.load(models / 'net_g_10.pth', weights_only=True)
    ckpt['params']['conv_first.weight'].view(-1)[0] = float('inf')
    torch.save(ckpt, models / 'net_g_20.pth')
    fail = _tool('export_student.py', str(tmp_path / 'experiments' / 'run'), '-o', str(tmp_path / 'inf.pth'),
                 cwd=tmp_path)
    assert fail.returncode == 1, fail.stderr[-2000:]
    assert 'net_g_20.pth' in fail.stderr and 'params.conv_first.weight (1 inf of' in fail.stderr
    assert 'will not export it' in fail.stderr and not (tmp_path / 'inf.pth').exists()

    missing = _tool('export_student.py', str(tmp_path / 'nothing'), cwd=tmp_path)
    assert missing.returncode == 1 and 'no such file or folder' in missing.stderr


# ------------------------------------------------------------------ krdistill-train / krdistill-test
def test_krdistill_train_success_exits_0_and_failure_exits_1(tmp_path):
    opt = tiny_opt(tmp_path, total_iter=2)
    opt['logger']['save_checkpoint_freq'] = 2
    opt['val']['val_freq'] = 100
    ok = _script('krdistill-train', '-opt', str(write_yaml(opt, tmp_path / 'ok.yml')), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / 'experiments' / opt['name'] / 'models' / 'net_g_2.pth').is_file()

    (tmp_path / 'evil.yml').write_text((tmp_path / 'ok.yml').read_text()
                                       + f'note: !!python/object/apply:os.system ["touch {tmp_path / "ran"}"]\n')
    fail = _script('krdistill-train', '-opt', str(tmp_path / 'evil.yml'), cwd=tmp_path)
    assert fail.returncode == 1 and 'UnsafeYAMLError' in fail.stderr and 'evil.yml' in fail.stderr
    assert not (tmp_path / 'ran').exists()


def test_krdistill_test_success_exits_0_and_failure_exits_1(tmp_path):
    hr, lr = write_pairs(tmp_path / 'data', n=2, size=32, scale=2)
    teacher = save_teacher(tmp_path / 'teacher.pth', TINY_T)
    opt = {'name': 'tiny_test', 'model_type': 'SRModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
           'datasets': {'test_1': {'name': 'synthetic', 'type': 'PairedImageDataset', 'dataroot_gt': str(hr),
                                   'dataroot_lq': str(lr), 'io_backend': {'type': 'disk'}}},
           'network_g': TINY_T, 'path': {'pretrain_network_g': str(teacher), 'param_key_g': 'params',
                                         'strict_load_g': True},
           'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2,
                                                            'test_y_channel': True}}}}
    (tmp_path / 'ok.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    ok = _script('krdistill-test', '-opt', str(tmp_path / 'ok.yml'), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert list((tmp_path / 'results' / 'tiny_test').glob('test_*.log'))

    bad = dict(opt, model_type='KDSRModel')  # krdistill's model: its load refuses the NaN checkpoint
    ckpt = torch.load(teacher, weights_only=True)
    ckpt['params']['conv_first.weight'].view(-1)[0] = float('nan')
    torch.save(ckpt, tmp_path / 'nan.pth')
    bad['path'] = dict(opt['path'], pretrain_network_g=str(tmp_path / 'nan.pth'))
    (tmp_path / 'bad.yml').write_text(yaml.safe_dump(bad, sort_keys=False))
    fail = _script('krdistill-test', '-opt', str(tmp_path / 'bad.yml'), cwd=tmp_path)
    assert fail.returncode == 1, fail.stderr[-3000:]
    assert 'path.pretrain_network_g' in fail.stderr and 'nan.pth holds non-finite' in fail.stderr

"""BasicSR's own entry point finds krdistill's classes through the interpreter-start hook
(``krdistill-autoload.pth``), which imports nothing until basicsr is imported and can be switched off."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import basicsr
import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt, write_pairs, write_yaml

REPO = Path(__file__).resolve().parents[1]


def _site_with_pth(tmp_path: Path) -> Path:
    site_dir = tmp_path / 'site'
    site_dir.mkdir()
    shutil.copy(REPO / 'krdistill-autoload.pth', site_dir)
    return site_dir


def _python(code: str, site_dir: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    prelude = f'import site; site.addsitedir({str(site_dir)!r}); '  # processes the .pth as at start-up
    return subprocess.run([sys.executable, '-c', prelude + code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


def test_hook_imports_nothing_until_basicsr_is_imported(tmp_path):
    site_dir = _site_with_pth(tmp_path)
    out = _python('import sys, json; print(json.dumps(sorted(m for m in ("torch", "krdistill", "basicsr") '
                  'if m in sys.modules)))', site_dir, tmp_path, KRDISTILL_AUTOLOAD='1')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == '[]'


def test_opt_out(tmp_path):
    site_dir = _site_with_pth(tmp_path)
    code = ('import sys\ntry:\n    import basicsr\nexcept ImportError:\n    pass\n'
            'print("krdistill" in sys.modules)')
    out = _python(code, site_dir, tmp_path, KRDISTILL_AUTOLOAD='0')
    assert out.stdout.strip().splitlines()[-1] == 'False', out.stderr


def test_basicsr_train_py_runs_a_metakd_config_unmodified(tmp_path):
    """``python basicsr/train.py -opt X.yml`` of a BasicSR checkout, with krdistill installed."""
    checkout = tmp_path / 'BasicSR'
    (checkout / 'basicsr').mkdir(parents=True)
    shutil.copy(Path(basicsr.__file__).parent / 'train.py', checkout / 'basicsr' / 'train.py')
    opt = tiny_metakd_opt(tmp_path / 'work', total_iter=4)
    opt['logger'].update(print_freq=2, save_checkpoint_freq=4)
    opt['val']['val_freq'] = 4
    yml = write_yaml(opt, tmp_path / 'tiny_metakd.yml')
    site_dir = _site_with_pth(tmp_path)
    code = ('import runpy, sys; sys.argv = ["basicsr/train.py", "-opt", ' + repr(str(yml)) + ']; '
            'runpy.run_path("basicsr/train.py", run_name="__main__")')
    out = _python(code, site_dir, checkout, KRDISTILL_AUTOLOAD='1', OMP_NUM_THREADS='1')
    assert out.returncode == 0, out.stderr[-3000:]
    models = checkout / 'experiments' / opt['name'] / 'models'
    assert (models / 'net_g_4.pth').is_file() and (models / 'net_kr_4.pth').is_file()


def test_wheel_ships_the_hook(tmp_path):
    out = subprocess.run([sys.executable, 'setup.py', '-q', 'build_py', '--build-lib', str(tmp_path / 'lib')],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / 'lib' / 'krdistill-autoload.pth').read_text().startswith('import _krdistill_autoload')
    assert (tmp_path / 'lib' / '_krdistill_autoload.py').is_file()


# ------------------------------------------------------------------ BasicSR's own train.py, checked datasets
def _basicsr_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / 'BasicSR'
    (checkout / 'basicsr').mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(basicsr.__file__).parent / 'train.py', checkout / 'basicsr' / 'train.py')
    return checkout


def _basicsr_train(tmp_path: Path, yml: Path, *args: str) -> subprocess.CompletedProcess:
    checkout = tmp_path / 'BasicSR'
    if not (checkout / 'basicsr' / 'train.py').is_file():
        _basicsr_checkout(tmp_path)
    site_dir = tmp_path / 'site' if (tmp_path / 'site').is_dir() else _site_with_pth(tmp_path)
    argv = ['basicsr/train.py', '-opt', str(yml), *args]
    code = f'import runpy, sys; sys.argv = {argv!r}; runpy.run_path("basicsr/train.py", run_name="__main__")'
    return _python(code, site_dir, checkout, KRDISTILL_AUTOLOAD='1', OMP_NUM_THREADS='1')


def _kd_opt(root: Path) -> dict:
    opt = tiny_opt(root, total_iter=2)
    for d in opt['datasets'].values():
        d['type'] = 'CheckedPairedImageDataset'
    return opt


def _empty_gt(opt, root):
    (root / 'empty').mkdir()
    opt['datasets']['train']['dataroot_gt'] = str(root / 'empty')


def _corrupt_png(opt, root):
    hr, lr = write_pairs(root / 'corrupt', n=2, size=32, scale=2)
    (hr / 'img001.png').write_bytes((hr / 'img001.png').read_bytes()[:60])
    opt['datasets']['train'].update(dataroot_gt=str(hr), dataroot_lq=str(lr))


def _size_mismatch(opt, root):
    hr, lr = write_pairs(root / 'x4', n=2, size=32, scale=4)  # LR 8x8 for a x2 run
    opt['datasets']['train'].update(dataroot_gt=str(hr), dataroot_lq=str(lr))


BROKEN = {
    'empty GT folder': (_empty_gt, 'datasets.train.dataroot_gt: no images'),
    'corrupt PNG': (_corrupt_png, 'corrupt or unreadable image'),
    'LR/GT size mismatch': (_size_mismatch, 'must be exactly scale (2) x the LR'),
}


@pytest.mark.parametrize('case', BROKEN)
def test_basicsr_train_py_reports_broken_data_before_the_first_iteration(tmp_path, case):
    mutate, message = BROKEN[case]
    opt = _kd_opt(tmp_path / 'work')
    mutate(opt, tmp_path / 'work')
    out = _basicsr_train(tmp_path, write_yaml(opt, tmp_path / 'bad.yml'))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-3000:]
    assert 'ZeroDivisionError' not in out.stderr and "'NoneType' object" not in out.stderr
    exp = tmp_path / 'BasicSR' / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='BasicSR resumes itself on a CUDA machine')
@pytest.mark.parametrize('how', ['path.resume_state', '--auto_resume', 'python -m basicsr.train'])
def test_basicsr_train_py_resume_without_cuda_points_to_krdistill_train(tmp_path, how):
    opt = _kd_opt(tmp_path / 'work')
    args = []
    if how == '--auto_resume':
        states = tmp_path / 'BasicSR' / 'experiments' / opt['name'] / 'training_states'
        states.mkdir(parents=True)
        torch.save({'epoch': 0, 'iter': 2}, states / '2.state')
        args = ['--auto_resume']
    else:
        opt['path']['resume_state'] = str(tmp_path / 'work' / '2.state')
    yml = write_yaml(opt, tmp_path / 'resume.yml')
    if how == 'python -m basicsr.train':
        out = subprocess.run([sys.executable, '-m', 'basicsr.train', '-opt', str(yml)], cwd=tmp_path,
                             capture_output=True, text=True, env=dict(os.environ, KRDISTILL_AUTOLOAD='1'), timeout=300)
    else:
        out = _basicsr_train(tmp_path, yml, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    assert 'without CUDA' in lines[0] and 'use krdistill-train -opt <file> [same args]' in lines[0]
    assert f'krdistill-train -opt {yml}' in lines[0]


def test_basicsr_train_problem(tmp_path, monkeypatch):
    """What the autoload check stops under BasicSR's train.py, and what it leaves to BasicSR."""
    from krdistill.entry import basicsr_train_problem
    monkeypatch.chdir(tmp_path)
    opt = _kd_opt(tmp_path)
    yml = str(write_yaml(opt, tmp_path / 'kd.yml'))
    assert basicsr_train_problem(['-opt', yml], cuda_available=False) is None  # a fresh run works
    assert basicsr_train_problem(['-opt', yml, '--auto_resume'], cuda_available=False) is None  # nothing to resume
    assert 'launcher pytorch' in basicsr_train_problem(['-opt', yml, '--launcher', 'pytorch'], cuda_available=False)
    assert basicsr_train_problem(['-opt', yml, '--launcher', 'pytorch'], cuda_available=True) is None
    force = ['-opt', yml, '--force_yml', 'path:resume_state=x.state']
    assert 'without CUDA' in basicsr_train_problem(force, cuda_available=False)
    assert basicsr_train_problem(force, cuda_available=True) is None  # the teacher is listed in ignore_resume_networks
    assert 'without CUDA' in basicsr_train_problem(force + ['name=other'], cuda_available=False)
    states = tmp_path / 'experiments' / opt['name'] / 'training_states'
    states.mkdir(parents=True)
    (states / '2.state').write_bytes(b'')
    assert 'without CUDA' in basicsr_train_problem(['-opt', yml, '--auto_res'], cuda_available=False)  # abbreviated
    # --debug: BasicSR looks in experiments/debug_<name>, where nothing is
    assert basicsr_train_problem(['-opt', yml, '--auto_resume', '--debug'], cuda_available=False) is None

    teacher = copy.deepcopy(opt)
    teacher['path'].update(resume_state='x.state', ignore_resume_networks=None)
    yml_t = str(write_yaml(teacher, tmp_path / 't.yml'))
    assert 'network_t not in path.ignore_resume_networks' in basicsr_train_problem(['-opt', yml_t], cuda_available=True)
    teacher['path'].update(ignore_resume_networks=['network_t'], param_key_t='params_ema')
    yml_t = str(write_yaml(teacher, tmp_path / 't.yml'))
    assert 'param_key_t: params_ema' in basicsr_train_problem(['-opt', yml_t], cuda_available=True)

    plain = copy.deepcopy(teacher)
    plain['model_type'] = 'SRModel'  # not krdistill's: left to BasicSR
    assert basicsr_train_problem(['-opt', str(write_yaml(plain, tmp_path / 'sr.yml'))], cuda_available=False) is None
    assert basicsr_train_problem(['-opt', str(tmp_path / 'missing.yml')], cuda_available=False) is None
    assert basicsr_train_problem(['--auto_resume'], cuda_available=False) is None  # BasicSR reports a missing -opt

"""BasicSR's own entry point finds krdistill's classes through the interpreter-start hook
(``krdistill-autoload.pth``), which imports nothing until basicsr is imported and can be switched off."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import basicsr

from helpers import tiny_metakd_opt, write_yaml

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

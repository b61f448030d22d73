"""The framework-free modules import nothing from BasicSR (or mmengine): statically (ast over the
files) and at run time (a subprocess where ``import basicsr`` fails runs one MetaKD step)."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'krdistill'
FRAMEWORK_FREE = ['features.py', 'distiller.py', 'meta.py', 'meta_options.py', 'meta_objectives.py', 'metakd.py',
                  'build.py', 'io.py', 'option_checks.py', 'upcycle.py', 'resize.py', 'archs/krnet_arch.py', 'losses/texture_loss.py', 'losses/kd_loss.py']
FORBIDDEN = ('basicsr', 'mmengine', 'mmcv', 'mmagic')


def _module_name(rel: str) -> str:
    return 'krdistill.' + rel[:-3].replace('/', '.')


def _imports(rel: str) -> list[str]:
    """Absolute names of everything ``rel`` imports (relative imports resolved)."""
    tree = ast.parse((PKG / rel).read_text(), filename=rel)
    package = _module_name(rel).rsplit('.', 1)[0].split('.')
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = '.'.join(base + ([node.module] if node.module else []))
            names.append(mod)
            names += [f'{mod}.{a.name}' for a in node.names]  # `from . import x` may name a module
    return names


@pytest.mark.parametrize('rel', FRAMEWORK_FREE)
def test_static_imports_are_torch_only(rel):
    allowed_internal = {_module_name(r) for r in FRAMEWORK_FREE}
    for name in _imports(rel):
        top = name.split('.')[0]
        assert top not in FORBIDDEN, f'krdistill/{rel} imports {name}'
        if top == 'krdistill':
            # Internal imports stay inside the framework-free set (their packages' __init__ files
            # register in BasicSR only when it is installed, tested below at run time).
            target = name if name in allowed_internal else name.rsplit('.', 1)[0]
            assert target in allowed_internal, f'krdistill/{rel} imports {name}, outside the framework-free set'


def test_runs_with_basicsr_blocked():
    code = textwrap.dedent('''
        import sys
        for name in ('basicsr', 'mmengine', 'mmcv', 'mmagic', 'torchvision'):
            sys.modules[name] = None  # any import of them raises ImportError (torchvision: not needed either)
        import torch
        from torch import nn
        import krdistill.build, krdistill.io, krdistill.features, krdistill.distiller, krdistill.meta, krdistill.metakd
        import krdistill.meta_options, krdistill.meta_objectives, krdistill.upcycle, krdistill.resize
        import krdistill.archs.krnet_arch, krdistill.losses.texture_loss, krdistill.losses.kd_loss
        from krdistill.build import build_metakd, build_optimizer

        def net(nf, nb):
            m = nn.Sequential()
            m.add_module('head', nn.Conv2d(3, nf, 3, padding=1))
            m.add_module('body', nn.Sequential(*[nn.Conv2d(nf, nf, 3, padding=1) for _ in range(nb)]))
            m.add_module('up', nn.Sequential(nn.Conv2d(nf, 12, 3, padding=1), nn.PixelShuffle(2)))
            return m

        torch.manual_seed(0)
        teacher, student = net(8, 2), net(4, 1)
        mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=dict(type='KRNet', width=4, hidden=8))
        opt = torch.optim.Adam(student.parameters(), 1e-3)
        opt_kr = build_optimizer(dict(type='Adam', lr=1e-4), mkd.kr_parameters())
        logs = mkd.train_step(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16), opt, opt_kr, it=16).logs  # a meta step
        assert {'l_pix', 'l_texture', 'l_meta'} <= set(logs), logs
        loaded = sorted(k for k in sys.modules if k.split('.')[0] in ('basicsr', 'mmengine', 'mmcv', 'mmagic')
                        and sys.modules[k] is not None)
        assert not loaded, loaded
        print('OK', {k: round(float(v), 4) for k, v in logs.items()})
    ''')
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'OK' in res.stdout

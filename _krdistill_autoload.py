"""Make BasicSR's own entry points (``python basicsr/train.py -opt ...``) find krdistill's classes.

Installed with krdistill as ``krdistill-autoload.pth`` in site-packages, which runs
``_krdistill_autoload.install()`` at interpreter start. That only puts a finder on
``sys.meta_path``; nothing is imported until a program imports ``basicsr`` itself. Then,
before basicsr's code runs, the torchvision shim is applied, and right after it, ``krdistill``
is imported (its classes register in BasicSR's registries). Processes that never import basicsr
never import torch or krdistill.

Opt out with the environment variable ``KRDISTILL_AUTOLOAD=0``.
"""
import importlib
import os
import sys

__all__ = ['install', 'alias_functional_tensor']


def alias_functional_tensor() -> None:
    """torchvision >= 0.17 renamed ``transforms.functional_tensor``; basicsr 1.4.2 imports the old name."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except ImportError:
        try:
            mod = importlib.import_module('torchvision.transforms._functional_tensor')
        except ImportError:  # torchvision absent or too different: leave basicsr to fail loudly
            return
        sys.modules[name] = mod


class _Loader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        alias_functional_tensor()
        self._loader.exec_module(module)
        try:
            importlib.import_module('krdistill')
        except Exception as e:  # noqa: BLE001  (never break basicsr because of the plug-in)
            sys.stderr.write(f'krdistill autoload: import krdistill failed ({type(e).__name__}: {e}); '
                             'set KRDISTILL_AUTOLOAD=0 to silence\n')

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Meta path finder that wraps the loader of the top-level ``basicsr`` package once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'basicsr':
            return None
        sys.meta_path.remove(self)  # once, and no recursion
        from importlib.util import find_spec
        spec = find_spec('basicsr')
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if os.environ.get('KRDISTILL_AUTOLOAD', '1').lower() in ('0', 'false', 'no', 'off'):
        return
    if 'basicsr' in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def _site_dir() -> str:
    import site
    import sysconfig
    return sysconfig.get_paths()['purelib'] if sys.prefix != sys.base_prefix else site.getsitepackages()[0]


def main(argv=None) -> int:
    """``python -m _krdistill_autoload install|uninstall|status``: manage the .pth by hand.

    A regular ``pip install`` ships the .pth; an editable install (``pip install -e``) does
    not, so ``make setup`` runs ``install``.
    """
    import argparse
    parser = argparse.ArgumentParser(prog='python -m _krdistill_autoload', description=main.__doc__)
    parser.add_argument('action', choices=['install', 'uninstall', 'status'])
    args = parser.parse_args(argv)
    path = os.path.join(_site_dir(), 'krdistill-autoload.pth')
    line = 'import _krdistill_autoload; _krdistill_autoload.install()\n'
    if args.action == 'install':
        with open(path, 'w') as f:
            f.write(line)
    elif args.action == 'uninstall' and os.path.exists(path):
        os.remove(path)
    print(f'{path}: {"present" if os.path.exists(path) else "absent"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Make BasicSR's own entry points (``python basicsr/train.py -opt ...``) find krdistill's classes.

Installed with krdistill as ``krdistill-autoload.pth`` in site-packages, which runs
``_krdistill_autoload.install()`` at interpreter start. That only puts a finder on
``sys.meta_path``; nothing is imported until a program imports ``basicsr`` itself. Then:

1. before basicsr's code runs, the torchvision alias of ``krdistill/compat.py`` is applied. The
   file is loaded by its path (``importlib.util.spec_from_file_location``), without importing the
   krdistill package, whose ``__init__`` imports basicsr;
2. right after basicsr is loaded, ``krdistill`` (and ``krdistill.data``) is imported: its classes
   register in BasicSR's registries. Nothing of BasicSR is replaced;
3. when the running program is BasicSR's ``basicsr/train.py`` or ``basicsr/test.py``, before BasicSR
   reads its options (see :func:`krdistill.entry.check_basicsr_train`): the ``-opt`` file is read
   with krdistill's safe YAML loader, and a krdistill run whose file holds a Python tag (which
   BasicSR's unsafe loader would run) stops with code 2, naming the file and the tag; a run of
   another model gets one warning line and is left to BasicSR. Under ``train.py``, a krdistill run
   that would crash in BasicSR code gets one line saying why and to use ``krdistill-train``, and the
   process exits with code 2.

Processes that never import basicsr never import torch or krdistill. This module imports the
standard library only. Opt out with the environment variable ``KRDISTILL_AUTOLOAD=0``.
"""
import importlib
import importlib.util
import os
import sys

__all__ = ['install', 'alias_functional_tensor']


def _early_compat():
    """``krdistill/compat.py`` loaded by file path (stdlib only), or None if krdistill is not found."""
    spec = importlib.util.find_spec('krdistill')  # a top-level name: locates, does not import
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, 'compat.py')
        if os.path.isfile(path):
            early = importlib.util.spec_from_file_location('_krdistill_compat_early', path)
            module = importlib.util.module_from_spec(early)
            early.loader.exec_module(module)
            return module
    return None


def alias_functional_tensor() -> None:
    """torchvision >= 0.17 renamed ``transforms.functional_tensor``; basicsr 1.4.2 imports the old name
    (one implementation: ``krdistill/compat.py``)."""
    compat = _early_compat()
    if compat is not None:
        compat.alias_functional_tensor()


def _opted_out() -> bool:
    return os.environ.get('KRDISTILL_AUTOLOAD', '1').lower() in ('0', 'false', 'no', 'off')


class _Loader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            alias_functional_tensor()
        except Exception as e:  # noqa: BLE001  (never break basicsr because of the plug-in)
            sys.stderr.write(f'krdistill autoload: torchvision alias failed ({type(e).__name__}: {e})\n')
        self._loader.exec_module(module)
        try:
            importlib.import_module('krdistill')
            importlib.import_module('krdistill.data')
            from krdistill.entry import check_basicsr_train
        except Exception as e:  # noqa: BLE001  (never break basicsr because of the plug-in)
            sys.stderr.write(f'krdistill autoload: import krdistill failed ({type(e).__name__}: {e}); '
                             'set KRDISTILL_AUTOLOAD=0 to silence\n')
            return
        check_basicsr_train()  # exits with code 2 on a krdistill run whose options would run code or crash

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Meta path finder that wraps the loader of the top-level ``basicsr`` package once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'basicsr':
            return None
        sys.meta_path.remove(self)  # once, and no recursion
        spec = importlib.util.find_spec('basicsr')
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _opted_out():
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

"""krdistill: meta knowledge distillation for single-image super-resolution, as a BasicSR plug-in.

Importing the package applies the one upstream shim BasicSR 1.4.2 needs to import at all
(:mod:`krdistill.compat`: a torchvision module alias) and registers krdistill's archs, losses,
datasets and models in BasicSR's registries. Nothing of BasicSR is replaced.

Without basicsr installed, the torch-only parts still import: :class:`~krdistill.metakd.MetaKD`
and :class:`~krdistill.distiller.Distiller` (the algorithms), :mod:`krdistill.build` (options ->
algorithm), :mod:`krdistill.features`, :mod:`krdistill.meta`, the arch and loss modules;
``krdistill.mmengine`` is the mmengine front end.
"""
import importlib

from . import compat

compat.apply()

from .version import __version__  # noqa: E402

try:
    import basicsr  # noqa: F401
except ModuleNotFoundError as _e:  # framework-free use
    if _e.name != 'basicsr':
        raise
    _HAS_BASICSR = False
else:
    _HAS_BASICSR = True
    from . import archs, data, losses, models  # noqa: F401,E402  (registration)

__all__ = ['__version__', 'MetaKD', 'Distiller', 'build_metakd', 'build_distiller', 'build_optimizer']

_LAZY = {'MetaKD': 'metakd', 'Distiller': 'distiller', 'build_metakd': 'build', 'build_distiller': 'build',
         'build_optimizer': 'build'}


def __getattr__(name):
    # the torch-only API, imported on first use only
    if name in _LAZY:
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

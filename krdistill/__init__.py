"""krdistill: meta knowledge distillation for single-image super-resolution, as a BasicSR plug-in.

Importing the package applies the upstream shims (:mod:`krdistill.compat`) and registers
krdistill's archs, losses and models in BasicSR's registries. Nothing else runs at import.
Without basicsr installed, the torch-only parts (``features``, ``meta``, ``distiller``,
``metakd``, ``api``, the arch and loss modules) still import; ``krdistill.MetaKD`` is the
framework-free API (:mod:`krdistill.api`), ``krdistill.mmengine`` the mmengine front end.
"""
from . import compat

compat.apply()

from .version import __version__  # noqa: E402

try:
    import basicsr  # noqa: F401
except ImportError:  # framework-free use
    _HAS_BASICSR = False
else:
    _HAS_BASICSR = True
    from . import archs, losses, models  # noqa: F401,E402  (registration)

__all__ = ['__version__', 'MetaKD']


def __getattr__(name):
    # ``from krdistill import MetaKD``: the framework-free API, imported on first use only.
    if name == 'MetaKD':
        from .api import MetaKD
        return MetaKD
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

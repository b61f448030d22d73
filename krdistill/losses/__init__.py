"""krdistill losses. ``*_loss.py`` files are torch-only (a pure function plus a thin module);
the ``nn.Module`` classes in their ``__all__`` are registered here in BasicSR's LOSS_REGISTRY.
Without basicsr installed the modules are still imported (framework-free use) and nothing is
registered."""
import importlib
import inspect
import os
from os import path as osp

from torch import nn

try:
    import basicsr  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != 'basicsr':  # basicsr is there but broken: fail loudly
        raise
    LOSS_REGISTRY = None  # framework-free use: no registry to fill
else:
    from basicsr.utils.registry import LOSS_REGISTRY

from ..registry import register

_folder = osp.dirname(osp.abspath(__file__))
_names = sorted(osp.splitext(e.name)[0] for e in os.scandir(_folder) if e.is_file() and e.name.endswith('_loss.py'))
_modules = [importlib.import_module(f'krdistill.losses.{n}') for n in _names]
if LOSS_REGISTRY is not None:
    for _m in _modules:
        for _name in getattr(_m, '__all__', []):
            _obj = getattr(_m, _name)
            if inspect.isclass(_obj) and issubclass(_obj, nn.Module):
                register(LOSS_REGISTRY, _obj)

"""krdistill losses. ``*_loss.py`` files are torch-only (a pure function plus a thin module);
the ``nn.Module`` classes in their ``__all__`` are registered here in BasicSR's LOSS_REGISTRY."""
import importlib
import inspect
from os import path as osp

from basicsr.utils import scandir
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from ..registry import register

_folder = osp.dirname(osp.abspath(__file__))
_names = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_loss.py'))
_modules = [importlib.import_module(f'krdistill.losses.{n}') for n in _names]
for _m in _modules:
    for _name in getattr(_m, '__all__', []):
        _obj = getattr(_m, _name)
        if inspect.isclass(_obj) and issubclass(_obj, nn.Module):
            register(LOSS_REGISTRY, _obj)

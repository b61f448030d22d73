"""krdistill archs. ``*_arch.py`` files are torch-only; the ``nn.Module`` classes in their
``__all__`` are registered here in BasicSR's ARCH_REGISTRY (the YAML ``type`` is the class name)."""
import importlib
import inspect
from os import path as osp

from basicsr.utils import scandir
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from ..registry import register

_folder = osp.dirname(osp.abspath(__file__))
_names = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_arch.py'))
_modules = [importlib.import_module(f'krdistill.archs.{n}') for n in _names]
for _m in _modules:
    for _name in getattr(_m, '__all__', []):
        _obj = getattr(_m, _name)
        if inspect.isclass(_obj) and issubclass(_obj, nn.Module):
            register(ARCH_REGISTRY, _obj)

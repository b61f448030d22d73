"""krdistill archs. ``*_arch.py`` files are torch-only; the ``nn.Module`` classes in their
``__all__`` are registered in BasicSR's ARCH_REGISTRY (the YAML ``type`` is the class name).
Without basicsr installed the modules are still imported (framework-free use) and nothing is
registered."""
from os import path as osp

from ..registry import import_and_register

_modules = import_and_register(__name__, osp.dirname(osp.abspath(__file__)), '_arch.py', 'ARCH_REGISTRY')

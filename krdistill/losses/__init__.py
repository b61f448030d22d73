"""krdistill losses. ``*_loss.py`` files are torch-only (a pure function plus a thin module); the
``nn.Module`` classes in their ``__all__`` are registered in BasicSR's LOSS_REGISTRY. Without
basicsr installed the modules are still imported (framework-free use) and nothing is registered."""
from os import path as osp

from ..registry import import_and_register

_modules = import_and_register(__name__, osp.dirname(osp.abspath(__file__)), '_loss.py', 'LOSS_REGISTRY')

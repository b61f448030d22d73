"""The one upstream version shim: what BasicSR 1.4.2 needs to *import* on current torchvision.

torchvision >= 0.17 renamed ``transforms.functional_tensor`` to ``_functional_tensor``; basicsr
1.4.2 imports the old name at import time (``basicsr/data/degradations.py``), so without an alias
``import basicsr`` fails. :func:`alias_functional_tensor` registers the new module under the old
name. That is all: importing krdistill replaces no BasicSR function (an unrelated BasicSR run in
the same environment behaves exactly as without krdistill). What krdistill's own entry point
changes for the duration of its own runs lives in :mod:`krdistill.entry`.

This file imports the standard library only, and nothing of krdistill: the interpreter-start hook
(``_krdistill_autoload``) loads it by file path, before basicsr's code runs and without importing
the krdistill package (whose ``__init__`` imports basicsr).
"""
from __future__ import annotations

import importlib
import sys

__all__ = ['alias_functional_tensor', 'apply']

_OLD = 'torchvision.transforms.functional_tensor'
_NEW = 'torchvision.transforms._functional_tensor'


def alias_functional_tensor() -> None:
    """Make ``import torchvision.transforms.functional_tensor`` work on torchvision >= 0.17.

    Idempotent; does nothing when the old name still imports, and nothing when torchvision is
    absent (basicsr then fails loudly on its own).
    """
    if _OLD in sys.modules:
        return
    try:
        importlib.import_module(_OLD)
    except ImportError:
        try:
            mod = importlib.import_module(_NEW)
        except ImportError:  # torchvision absent or too different: leave basicsr to fail loudly
            return
        sys.modules[_OLD] = mod


def apply() -> None:
    """Apply the shim (called by ``krdistill/__init__.py`` before anything imports basicsr). Safe to repeat."""
    alias_functional_tensor()

"""Shared body of the thin entry points ``krdistill/train.py`` and ``krdistill/test.py``."""
from __future__ import annotations

import importlib
import os
import sys


def run_pipeline(module: str, func: str, argv: list[str] | None, root_path: str | None, prog: str) -> None:
    """Call ``basicsr.<module>.<func>(root_path)`` with ``argv`` as the command line.

    krdistill is imported first (shims + registration). ``root_path`` defaults to the current
    folder, so runs land in ``./experiments`` / ``./results``, never in site-packages.
    """
    import krdistill  # noqa: F401

    pipeline = getattr(importlib.import_module(module), func)
    saved = sys.argv
    if argv is not None:
        sys.argv = [prog, *argv]
    try:
        pipeline(os.path.abspath(root_path or os.getcwd()))
    finally:
        sys.argv = saved

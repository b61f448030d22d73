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

    _reset_basicsr_logger()
    pipeline = getattr(importlib.import_module(module), func)
    saved = sys.argv
    if argv is not None:
        sys.argv = [prog, *argv]
    try:
        pipeline(os.path.abspath(root_path or os.getcwd()))
    finally:
        sys.argv = saved


def _reset_basicsr_logger() -> None:
    """Let the next ``get_root_logger(log_file=...)`` attach this run's log file.

    BasicSR initialises its logger once per process; a second run in the same process (a
    benchmark, a test, a notebook) would otherwise write no log file of its own.
    """
    import logging

    from basicsr.utils import logger as bsr_logger
    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    bsr_logger.initialized_logger.pop('basicsr', None)

"""mmengine 0.10.7 under torch >= 2.6: load the checkpoints the Runner writes.

**The problem.** ``mmengine.runner.checkpoint`` loads every checkpoint with ``torch.load(f,
map_location=...)`` and no ``weights_only`` argument (``load_from_local``,
``load_from_http``/``load_url``, ``load_from_ceph``, ``load_from_mmcls``, ...). Since torch 2.6
the default is ``weights_only=True``, which refuses any pickled object that is not a tensor or a
plain container. A Runner checkpoint holds such objects: the ``message_hub`` state
(``mmengine.logging.HistoryBuffer`` with numpy arrays inside, numpy scalars among the runtime
info). So ``runner.resume()`` / ``load_from`` fail with ``WeightsUnpickler error: Unsupported
global: GLOBAL mmengine.logging.history_buffer.HistoryBuffer``.

**The fix** (applied by ``import krdistill.mmengine``; idempotent): every checkpoint load of
mmengine goes through the classmethod ``CheckpointLoader.load_checkpoint``; it is wrapped so the
load runs inside ``torch.serialization.safe_globals(...)`` with exactly the globals the Runner
writes (:data:`CHECKPOINT_GLOBALS`): ``HistoryBuffer``, the numpy array/dtype/scalar
reconstructors, and, in place of ``builtins.getattr`` (``HistoryBuffer`` pickles its statistics
methods as ``getattr(HistoryBuffer, 'min')``), :func:`history_buffer_getattr`, which resolves only
those references. Loads stay ``weights_only=True``: a checkpoint that pickles anything else (code,
arbitrary classes, other ``getattr`` calls) is still refused, as torch intends. We do not switch
to ``weights_only=False``, which would execute arbitrary pickled code from any ``load_from`` URL.
A checkpoint holding a NaN or infinite tensor (weights or optimizer states) is refused, naming the
file and the tensors (:func:`krdistill.io.check_finite`).

If you trust a checkpoint that needs more types, add them with
``torch.serialization.add_safe_globals([...])`` (or pass ``extra`` to :func:`apply`).
"""
from __future__ import annotations

import functools
import pickle

import numpy as np
import torch

__all__ = ['CHECKPOINT_GLOBALS', 'apply', 'checkpoint_globals', 'history_buffer_getattr']

_APPLIED = False


def history_buffer_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` while loading: only ``HistoryBuffer``'s statistics methods.

    ``HistoryBuffer.__getstate__`` pickles its statistics methods (``min``, ``max``, ``current``,
    ``mean``) as ``getattr(HistoryBuffer, 'min')``. Allowing ``getattr`` itself would let a
    checkpoint reach any attribute of any allowed object; this stand-in resolves exactly those
    references and refuses everything else.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_') \
            and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'krdistill.mmengine: the checkpoint asks for getattr({obj!r}, {name!r}); only '
                                 'HistoryBuffer statistics methods are allowed under weights_only=True')


def checkpoint_globals() -> list:
    """Non-tensor globals found in mmengine Runner checkpoints (message hub, numpy logs)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    out = [HistoryBuffer, np.ndarray, np.dtype, (history_buffer_getattr, 'builtins.getattr')]
    try:  # numpy >= 1.25 / 2.x
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # older numpy
        from numpy.core.multiarray import _reconstruct, scalar
    out += [_reconstruct, scalar]
    # dtype classes (numpy >= 1.25 pickles np.dtype(...) through np.dtypes.<X>DType)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType') and isinstance(getattr(dtypes, n), type)]
    return out


CHECKPOINT_GLOBALS: list = []


def apply(extra: list | None = None) -> None:
    """Wrap ``mmengine.runner.checkpoint.CheckpointLoader.load_checkpoint`` (once)."""
    global _APPLIED
    if extra:
        CHECKPOINT_GLOBALS.extend(extra)
    if _APPLIED:
        return
    CHECKPOINT_GLOBALS.extend(checkpoint_globals())
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    if safe_globals is None:  # torch < 2.5: no weights_only default to fight
        _APPLIED = True
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    orig = CheckpointLoader.load_checkpoint.__func__
    if getattr(orig, '_krdistill_wrapped', False):
        _APPLIED = True
        return

    @functools.wraps(orig)
    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        from ..io import check_finite
        with safe_globals(list(CHECKPOINT_GLOBALS)):
            ckpt = orig(cls, filename, map_location, logger)
        check_finite(ckpt, filename, 'mmengine checkpoint (load_from / resume)')  # weights, optimizer states
        return ckpt

    load_checkpoint._krdistill_wrapped = True
    CheckpointLoader.load_checkpoint = classmethod(load_checkpoint)
    _APPLIED = True

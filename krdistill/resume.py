"""Exact resume for BasicSR's training loop: a resumed run continues where an uninterrupted run would.

BasicSR 1.4.2 resumes the optimizers, schedulers and weights, but not the stream of data: its loop
restarts the interrupted epoch from the first batch (``start_epoch = resume_state['epoch']``), and
the random number generators (crops and flips come from Python's ``random``) start from the seed
again. A resumed run therefore trains on other batches than the uninterrupted run would have. Two
additions make it exact:

1. **Random states in the training state.** ``KDSRModel`` (and so ``MetaKDModel``) saves the
   Python, NumPy, torch and CUDA generator states of every rank under ``resume_state['krdistill']``
   and restores them on resume: Python's and NumPy's at once (before the first batch is loaded),
   torch's when the first batch is fed to the model (creating the epoch's data iterator draws from
   torch's generator, exactly as it did in the uninterrupted run before the checkpoint).
2. **Skip what the interrupted epoch already consumed.** The train sampler (BasicSR's
   ``EnlargedSampler``, a permutation seeded by the epoch) skips the
   ``iter - epoch * len(train_loader)`` batches of the resumed epoch that were trained on before the
   checkpoint, without loading them (see :func:`skip_consumed_batches`; applied by
   ``krdistill-train`` (:mod:`krdistill.entry`) when the loaders are built).

Training states hold tensors, numbers, strings and containers only (:func:`rng_state`,
:func:`plain_state`) and are read with ``torch.load(..., weights_only=True)``
(:func:`load_training_state`): a file passed as ``path.resume_state`` never runs code.

With ``num_worker_per_gpu: 0`` the resumed run's batches, augmentations and losses are those of
the uninterrupted run (``tests/test_exact_resume.py``). With data-loader workers, the images and
their order are still the same, but BasicSR seeds each worker's ``random`` identically at every
epoch start, so the crops and flips of the rest of the *interrupted* epoch differ; from the next
epoch on they match again. ``meta.dataset`` (MetaKD's separate meta loader) restarts from its
first batch.
"""
from __future__ import annotations

import itertools
import pickle
import random
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ['rng_state', 'restore_host_rng', 'restore_torch_rng', 'skip_consumed_batches', 'plain_state',
           'load_training_state', 'RefusedStateError']


def rng_state() -> dict[str, Any]:
    """The generator states of this process: Python, NumPy, torch (CPU) and every CUDA device.

    Only tensors, ints, floats, strings, tuples, lists, dicts and None, so a training state that
    holds it loads with ``torch.load(..., weights_only=True)``: NumPy's key array (``uint32``)
    is stored as an ``int64`` tensor; :func:`restore_host_rng` converts it back.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                      float(cached_gaussian)),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_host_rng(state: dict[str, Any]) -> None:
    """Restore Python's and NumPy's generators (what data augmentation draws from)."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))  # tuples, even if a container came back as a list
    name, keys, pos, has_gauss, cached_gaussian = state['numpy']
    if torch.is_tensor(keys):
        keys = keys.cpu().numpy()
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached_gaussian)))


def restore_torch_rng(state: dict[str, Any]) -> None:
    """Restore torch's CPU generator and, when the device count matches, the CUDA generators."""
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda') or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def plain_state(obj: Any) -> Any:
    """``obj`` with every mapping turned into a plain ``dict`` and every tuple / list rebuilt, recursively.

    For training states written with ``torch.save`` and read with ``weights_only=True``: BasicSR's
    ``MultiStepRestartLR`` keeps its ``milestones`` as a ``collections.Counter`` (older torch
    refuses it); its scheduler code only uses ``in`` and ``[]`` on it, and
    ``load_state_dict`` puts the loaded value back, so a plain dict behaves the same. Named tuples
    become plain tuples. Tensors and every other value are returned as they are.
    """
    if isinstance(obj, Mapping):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain_state(v) for v in obj)
    if isinstance(obj, list):
        return [plain_state(v) for v in obj]
    return obj


class RefusedStateError(ValueError):
    """A training state holds objects other than tensors and plain containers; it is not loaded."""


def load_training_state(path: str, map_location: Any = 'cpu', key: str = 'path.resume_state') -> dict:
    """``torch.load(path, map_location=map_location, weights_only=True)`` with errors that name the file.

    A training state holds tensors, numbers, strings and containers only (see :func:`rng_state`,
    :func:`plain_state`); a file that holds anything else (a pickled object, whose loading could
    run code) is refused with :class:`RefusedStateError` and never unpickled. A truncated or
    damaged file raises ``ValueError``; one holding a non-finite tensor (optimizer moments, ...),
    :class:`krdistill.io.NonFiniteError`. ``key`` is the option that named the file, for the messages.
    """
    from .io import check_finite
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if 'weights only' not in text.lower() and 'weights_only' not in text.lower():
            raise ValueError(f'{key}: cannot read the training state {path} (truncated or not a torch file?): '
                             f'{type(e).__name__}: {text.splitlines()[0] if text else ""}') from None
        found = (re.search(r'GLOBAL ([A-Za-z_][\w.]*)', text)
                 or re.search(r'(Unsupported operand \S+)', text))
        what = f' (refused: {found.group(1)})' if found else ''
        raise RefusedStateError(
            f'{key}: {path} holds objects other than tensors, numbers, strings and containers{what}; '
            'krdistill loads training states with torch.load(weights_only=True) and will not load it. '
            'Resume from a training state written by this krdistill version.') from None
    except Exception as e:  # noqa: BLE001  (truncated or foreign: RuntimeError, OSError, EOFError, KeyError, ...)
        text = str(e).strip()
        raise ValueError(f'{key}: cannot read the training state {path} (truncated or not a torch file?): '
                         f'{type(e).__name__}: {text.splitlines()[0][:200] if text else ""}') from None
    check_finite(state, path, key)
    return state


class _SkipFirst(torch.utils.data.Sampler):
    """Wraps a sampler: the next pass drops its first ``skip`` indices, later passes are unchanged."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self):
        return len(self.sampler)


def skip_consumed_batches(loader, epoch: int, current_iter: int, batch_size: int) -> int:
    """Make the next pass of ``loader`` skip the batches of ``epoch`` trained on before ``current_iter``.

    ``loader``: the training DataLoader (``len(loader)`` batches per epoch, the last partial batch
    dropped, as BasicSR builds it); ``batch_size``: samples per batch on this rank. Returns the
    number of batches skipped (0 when the checkpoint fell on an epoch boundary). The loader's
    batch sampler then draws from a thin wrapper around its sampler; the sampler itself (and
    its ``set_epoch``) is unchanged.
    """
    per_epoch = len(loader)
    consumed = current_iter - epoch * per_epoch
    if not 0 <= consumed <= per_epoch:
        raise ValueError(f'resume: the checkpoint says epoch {epoch}, iter {current_iter}, which does not fit '
                         f'{per_epoch} batches per epoch; were datasets.train (images, dataset_enlarge_ratio) or '
                         f'batch_size_per_gpu changed since it was written?')
    if consumed == 0:
        return 0
    batch_sampler = loader.batch_sampler
    if batch_sampler is None or getattr(batch_sampler, 'sampler', None) is None:
        raise TypeError('resume: the train loader has no batch sampler to skip batches with')
    if not isinstance(batch_sampler.sampler, _SkipFirst):  # the loader's own BatchSampler iterates it
        batch_sampler.sampler = _SkipFirst(batch_sampler.sampler)
    batch_sampler.sampler.skip = consumed * batch_size
    return consumed

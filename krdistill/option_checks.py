"""Known option keys: one checker for every block of an option file (pure Python).

A misspelled key is worse than a missing one: BasicSR reads options with ``opt.get(key)``, so
``meat:`` for ``meta:`` or ``train.output_kd_op`` trains something other than what the user
wrote, with exit code 0. :func:`check_keys` refuses a key a block does not know, naming its full
YAML path and the nearest known key. The known keys live in one place per model
(``TeacherStudentModel.option_keys``, extended by each subclass); :func:`check_option_keys` runs
the check on the top level, ``train`` and ``path`` of an option file, the other blocks are checked
where they are read (``kd``, ``meta``, ``train.upcycle_opt``, and every block built from a class:
its signature).

BasicSR's own keys pass: those BasicSR 1.4.2 reads or writes for an ``SRModel``-based model
(``basicsr/utils/options.py``, ``basicsr/train.py``, ``BaseModel``, ``SRModel``, ``SRGANModel``).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Iterable, Mapping

__all__ = ['UnknownKeyError', 'check_keys', 'nearest_key', 'check_option_keys', 'path_keys', 'signature_keys',
           'BASICSR_TOP_KEYS', 'BASICSR_TRAIN_KEYS', 'BASICSR_PATH_KEYS', 'NETWORK_PATH_PREFIXES']

#: top-level keys of BasicSR 1.4.2 (the option file's and those ``parse_options`` / ``train.py`` add)
BASICSR_TOP_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'is_train', 'dist', 'rank',
                    'world_size', 'auto_resume', 'root_path', 'datasets', 'network_g', 'network_d', 'path', 'train',
                    'val', 'logger', 'dist_params', 'find_unused_parameters')
#: ``train:`` keys of BasicSR 1.4.2 (``train.py``, ``SRModel``, ``SRGANModel``)
BASICSR_TRAIN_KEYS = ('ema_decay', 'optim_g', 'optim_d', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt',
                      'perceptual_opt', 'gan_opt', 'net_d_iters', 'net_d_init_iters')
#: ``path:`` keys of BasicSR 1.4.2 besides the per-network ones (:data:`NETWORK_PATH_PREFIXES`)
BASICSR_PATH_KEYS = ('resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states',
                     'log', 'visualization', 'results_root')
#: ``path.<prefix>_<x>`` for each network ``network_<x>`` (``check_resume`` sets ``pretrain_network_<x>``)
NETWORK_PATH_PREFIXES = ('pretrain_network', 'param_key', 'strict_load')


class UnknownKeyError(KeyError):
    """An option key no reader knows. ``str()`` is the message itself (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def nearest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to ``key`` (difflib; case and ``-`` / ``_`` forgiven), or None."""
    known = [str(k) for k in known]
    folded = {k.lower().replace('-', '_'): k for k in known}
    k = str(key).lower().replace('-', '_')
    if k in folded:
        return folded[k]
    near = difflib.get_close_matches(k, list(folded), n=1, cutoff=0.6)
    return folded[near[0]] if near else None


def check_keys(block: Mapping, known: Iterable[str], where: str = '') -> None:
    """Raise :class:`UnknownKeyError` for the first key of ``block`` not in ``known``.

    Args:
        block: an option block (a mapping).
        known: the keys the block may hold.
        where: the block's YAML path (``''`` for the top level, ``train``, ``train.optim_kd``, ...);
            the message names ``<where>.<key>`` and the nearest known key.
    """
    if not isinstance(block, Mapping):
        raise TypeError(f'{where or "the option file"}: must be a mapping, got {type(block).__name__}')
    known = tuple(known)
    prefix = f'{where}.' if where else ''
    for key in block:
        if key in known:
            continue
        near = nearest_key(key, known)
        hint = f'; did you mean {prefix}{near}?' if near else ''
        raise UnknownKeyError(f'{prefix}{key}: unknown key{hint} (known here: {", ".join(sorted(map(str, known)))})')


def path_keys(networks: Iterable[str]) -> tuple[str, ...]:
    """The keys of ``path:`` for a model with the networks ``networks`` (``g``, ``t``, ``kr``, ...)."""
    per_net = tuple(f'{p}_{n}' for n in networks for p in NETWORK_PATH_PREFIXES)
    return BASICSR_PATH_KEYS + per_net


def check_option_keys(opt: Mapping, known: Mapping[str, Iterable[str]]) -> None:
    """Check the top level, ``train`` and ``path`` of an option file against a model's known keys.

    Args:
        opt: the option file (as ``parse_options`` returns it, or as written).
        known: ``{'': top-level keys, 'train': train keys}`` (a model's ``option_keys``); the
            ``path`` keys follow from the ``network_<x>`` keys of the top level (:func:`path_keys`).
    """
    top = tuple(known[''])
    check_keys(opt, top, '')
    for block, keys in known.items():
        if block and isinstance(opt.get(block), Mapping):
            check_keys(opt[block], keys, block)
    if isinstance(opt.get('path'), Mapping):
        networks = [k[len('network_'):] for k in top if k.startswith('network_')]
        check_keys(opt['path'], path_keys(networks), 'path')


def signature_keys(cls, skip: Iterable[str] = ('self', )) -> tuple[str, ...] | None:
    """The keyword arguments ``cls`` (a class or function) accepts, or None when it takes ``**kwargs``
    or has no readable signature (then nothing can be checked)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    skip = set(skip)
    return tuple(n for n, p in params.items() if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_run_options(opt: Mapping) -> None:
    """``train.total_iter`` is a whole number >= 1 (BasicSR trains nothing and exits 0 otherwise) and
    ``num_gpu`` asks for no CUDA device the machine lacks (torch's own error names no key)."""
    import torch
    total = (opt.get('train') or {}).get('total_iter')
    if isinstance(total, bool) or not isinstance(total, (int, float)) or total != total or int(total) != total \
            or total < 1:
        raise ValueError(f'train.total_iter: must be a whole number of iterations >= 1, got {total!r}')
    gpus = opt.get('num_gpu', 0)
    if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError(f'num_gpu: {gpus}, but torch finds no CUDA device on this machine; set num_gpu: 0 '
                           '(CPU) or auto')

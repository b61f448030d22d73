"""Image and checkpoint I/O: the one place every krdistill loader and writer goes through (numpy,
OpenCV and torch only).

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a file a user passes is
never allowed to run code. :func:`load_weights` is what loads a teacher (BasicSR model, mmengine
model, evaluation, export): it picks the parameter key, strips ``module.`` (and an optional
prefix), and on a non-strict load reports missing and unexpected keys and refuses a load that
matched too little of the network.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from os import path as osp
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ['IMG_EXTS', 'list_images', 'read_image', 'write_image', 'load_checkpoint', 'state_dict_from',
           'strip_prefix', 'load_weights', 'LoadReport']

IMG_EXTS = ('.png', '.bmp', '.jpg', '.jpeg', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


# ------------------------------------------------------------------------------------------ images
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly in ``folder`` (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'no such folder: {folder}')
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMG_EXTS and p.is_file() and not p.name.startswith('.'))


def read_image(path: str | os.PathLike, color: bool = True) -> np.ndarray:
    """Read an 8-bit image with OpenCV: BGR ``H x W x 3`` with ``color`` (grayscale replicated,
    alpha dropped), else unchanged (``H x W`` or ``H x W x C``)."""
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise OSError(f'cannot read image {path} (missing or not a valid image file)')
    if img.dtype != np.uint8:
        raise TypeError(f'{path}: only 8-bit images are supported, got {img.dtype}')
    if color:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        elif img.shape[2] == 4:
            img = img[..., :3]
    return img


def write_image(path: str | os.PathLike, img: np.ndarray, compress_level: int = 3) -> None:
    """Write an image (lossless PNG with ``compress_level``), creating the folder."""
    import cv2
    path = str(path)
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    params = [cv2.IMWRITE_PNG_COMPRESSION, compress_level] if path.lower().endswith('.png') else []
    if not cv2.imwrite(path, img, params):
        raise OSError(f'cannot write image {path}')


# ------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | os.PathLike, key: str = 'checkpoint', safe_globals: Iterable | None = None):
    """``torch.load(path, map_location='cpu', weights_only=True)`` with errors that name ``key``.

    ``safe_globals``: extra classes allowed while loading (e.g. mmengine's log buffers); nothing
    else that is not a tensor or a plain container is ever unpickled.
    """
    path = str(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{key}: no such file: {path}')
    ctx = torch.serialization.safe_globals(list(safe_globals)) if safe_globals else contextlib.nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, pickled code, ...)
        raise RuntimeError(f'{key}: cannot load {path} with weights_only=True (a damaged file, or one that holds '
                           f'objects other than tensors and plain containers, which krdistill never unpickles): '
                           f'{type(e).__name__}: {str(e)[:300]}') from e


def state_dict_from(ckpt, param_key: str | None, path: str = '', key: str = 'param_key') -> Mapping:
    """The state dict inside a checkpoint. ``param_key``: ``params`` / ``params_ema`` (BasicSR),
    ``state_dict`` (mmengine), ``None`` for a bare state dict, or ``'auto'``: ``params_ema``, then
    ``params``, then ``state_dict``, else the checkpoint itself."""
    if param_key == 'auto':
        if isinstance(ckpt, Mapping):
            for k in ('params_ema', 'params', 'state_dict'):
                if k in ckpt and isinstance(ckpt[k], Mapping):
                    return ckpt[k]
        return ckpt
    if param_key is None:
        return ckpt
    if not isinstance(ckpt, Mapping) or param_key not in ckpt:
        held = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise KeyError(f'{key}: {param_key!r} is not in {path}; it holds {held}')
    return ckpt[param_key]


def strip_prefix(state: Mapping, prefix: str | None = None) -> 'OrderedDict[str, torch.Tensor]':
    """``state`` with DataParallel/DDP ``module.`` prefixes removed and, with ``prefix``, only the
    keys that start with it (stripped), e.g. ``'generator.'`` for an MMagic checkpoint."""
    out = OrderedDict()
    for k, v in state.items():
        if prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
        while k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out


class LoadReport(dict):
    """What :func:`load_weights` loaded: ``loaded``, ``missing`` and ``unexpected`` key lists."""


def load_weights(net: nn.Module, path: str | os.PathLike, param_key: str | None = 'params', strict: bool = True,
                 prefix: str | None = None, key: str = 'path.pretrain_network_t',
                 key_param: str = 'path.param_key_t', key_strict: str = 'path.strict_load_t',
                 min_fraction: float = 0.9, safe_globals: Iterable | None = None, log=None) -> LoadReport:
    """Load weights from ``path`` into ``net``; errors name the option keys to fix.

    A strict load must match exactly. A non-strict load reports missing and unexpected keys
    (through ``log``) and refuses when fewer than ``min_fraction`` of the network's tensors were
    loaded with the right shape: training against a mostly random teacher is never silent.
    """
    ckpt = load_checkpoint(path, key, safe_globals)
    state = strip_prefix(state_dict_from(ckpt, param_key, str(path), key_param), prefix)
    if prefix and not state:
        raise KeyError(f'{key}: no key of {path} starts with {prefix!r}')
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    report = LoadReport(loaded=[k for k in own if k in state and k not in mismatched], missing=missing,
                        unexpected=unexpected, mismatched=mismatched)
    if strict:
        if missing or unexpected or mismatched:
            raise RuntimeError(
                f'{key}: {path} does not match the network ({len(missing)} missing, {len(unexpected)} unexpected, '
                f'{len(mismatched)} with another shape; e.g. missing {missing[:3]}, unexpected {unexpected[:3]}, '
                f'shape {mismatched[:3]}). Check the network options (type, num_feat, num_block, upscale, ...) '
                f'or {key_param}; {key_strict}: false loads a partial match.')
    else:
        if len(report['loaded']) < min_fraction * max(1, len(own)):
            raise RuntimeError(
                f'{key}: {key_strict} is false, but {path} matches only {len(report["loaded"])} of the network\'s '
                f'{len(own)} tensors ({len(missing)} missing, {len(mismatched)} with another shape, {len(unexpected)} '
                f'unexpected); refusing to train against a mostly random network. Check the network options.')
        if log is not None and (missing or unexpected or mismatched):
            log(f'{key}: non-strict load of {path}: {len(report["loaded"])}/{len(own)} tensors loaded; missing '
                f'{missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}')
    net.load_state_dict({k: state[k] for k in report['loaded']}, strict=False)
    return report

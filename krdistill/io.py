"""Option file, image and checkpoint I/O: the one place every krdistill loader and writer goes
through (PyYAML, numpy, OpenCV and torch only).

Option files are read with a safe YAML loader (:func:`load_yaml`, :class:`SafeOrderedLoader`):
mappings come back as ``OrderedDict`` in file order, as BasicSR's ``ordered_yaml`` gives them,
but a tag that would construct a Python object (``!!python/object/apply:os.system [...]``) is
refused before anything is constructed, with the file, the line, the option key and the tag.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a file a user passes is
never allowed to run code. Every error names the file and the option key that pointed to it
(:class:`CheckpointError`): missing, truncated or damaged, holding pickled objects, holding a
non-finite tensor (:func:`check_finite`), or a failed write (:func:`save_checkpoint`: a full or
read-only disk). :func:`load_weights` is what loads a teacher (BasicSR model, mmengine model,
evaluation, export): it picks the parameter key, strips ``module.`` (and an optional prefix), and
on a non-strict load reports missing and unexpected keys and refuses a load that matched too
little of the network.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
from collections import OrderedDict
from os import path as osp
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import yaml
from torch import nn

__all__ = ['IMG_EXTS', 'list_images', 'read_image', 'write_image', 'OptionFileError', 'UnsafeYAMLError',
           'SafeOrderedLoader', 'refused_tags', 'load_yaml', 'load_options', 'CheckpointError', 'NonFiniteError',
           'nonfinite_tensors', 'check_finite', 'load_checkpoint', 'save_checkpoint', 'write_error_cause',
           'state_dict_from', 'strip_prefix', 'load_weights', 'LoadReport']

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


def _check_is_file(path: str, key: str) -> None:
    if osp.isdir(path):
        raise IsADirectoryError(f'{key}: {path} is a folder, not a file')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{key}: no such file: {path}')


# ------------------------------------------------------------------------------------------ option files
class OptionFileError(ValueError):
    """An option (YAML) file krdistill will not read: a tag that could run code, broken YAML, or no
    mapping of options. The message names the file and the command-line option that named it."""


class UnsafeYAMLError(OptionFileError):
    """An option file holds a YAML tag that could run code or build Python objects (``!!python/...``)."""


_YAML_BASE = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)
_STD_TAG = 'tag:yaml.org,2002:'


def _short_tag(tag: str) -> str:
    return '!!' + tag[len(_STD_TAG):] if tag.startswith(_STD_TAG) else tag


class SafeOrderedLoader(_YAML_BASE):
    """PyYAML's safe loader with mappings as ``OrderedDict`` (file order, as BasicSR's
    ``ordered_yaml`` loader gives them) and a duplicate key refused.

    Only YAML's standard types are constructed (strings, numbers, booleans, null, timestamps,
    binary, lists, mappings, sets, ordered maps): a Python tag such as
    ``!!python/object/apply:os.system`` raises :class:`UnsafeYAMLError` and nothing is run.
    :func:`load_yaml` checks the whole document first, so every refused tag is listed at once.
    """


def _construct_mapping(loader: SafeOrderedLoader, node) -> OrderedDict:
    written = {}
    for key_node, _ in node.value:  # keys written in this mapping (merged ones may be overridden)
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _STD_TAG + 'merge':
            ident = (key_node.tag, key_node.value)
            if ident in written:
                mark = key_node.start_mark
                raise OptionFileError(f'{mark.name}, line {mark.line + 1}: the key {key_node.value!r} appears twice in '
                                      f'one mapping (lines {written[ident]} and {mark.line + 1}; the second would '
                                      'silently replace the first)')
            written[ident] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)  # '<<: *anchor' merge keys first, the written keys override them
    out = OrderedDict()
    for key_node, value_node in node.value:
        out[loader.construct_object(key_node, deep=True)] = loader.construct_object(value_node, deep=True)
    return out


def _construct_refused(loader: SafeOrderedLoader, node) -> None:
    mark = node.start_mark
    raise UnsafeYAMLError(f'{mark.name}, line {mark.line + 1}: the YAML tag {_short_tag(node.tag)} is refused '
                          '(krdistill reads option files with a safe loader; nothing was run)')


SafeOrderedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
SafeOrderedLoader.add_constructor(None, _construct_refused)


def refused_tags(node) -> list[tuple[str, int, str]]:
    """``(tag, line, key)`` of every node of a composed YAML document that :class:`SafeOrderedLoader`
    would refuse (``!!python/...`` and any other tag without a safe constructor); ``key`` is the
    dotted option key where it sits (``train.optim_g.lr``). Walks aliases once (no blow-up)."""
    allowed = set(SafeOrderedLoader.yaml_constructors) - {None} | {_STD_TAG + 'merge'}
    found, seen = [], set()
    stack = [(node, '')]
    while stack:
        n, where = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.tag not in allowed:
            found.append((_short_tag(n.tag), n.start_mark.line + 1, where or '(top level)'))
        if isinstance(n, yaml.MappingNode):
            for k, v in reversed(n.value):
                name = k.value if isinstance(k, yaml.ScalarNode) else '?'
                stack.append((v, f'{where}.{name}' if where else str(name)))
                stack.append((k, where))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in reversed(list(enumerate(n.value))):
                stack.append((v, f'{where}[{i}]'))
    return sorted(found, key=lambda t: t[1])


def load_yaml(path: str | os.PathLike, key: str = '-opt') -> Any:
    """The YAML document in ``path``, read safely (:class:`SafeOrderedLoader`); ``None`` when empty.

    The document is composed first (parsing only, nothing constructed) and refused with
    :class:`UnsafeYAMLError` if any node carries a tag that could construct a Python object; the
    message names ``key`` (the option that named the file), the file, and each tag with its line
    and option key. A missing file raises ``FileNotFoundError``; unreadable text or broken YAML,
    :class:`OptionFileError`; both name ``key`` and the file.
    """
    path = str(path)
    _check_is_file(path, key)
    try:
        with open(path, encoding='utf-8') as f:
            loader = SafeOrderedLoader(f)
            try:
                node = loader.get_single_node()
                tags = refused_tags(node)
                if tags:
                    listed = '; '.join(f'{t} at line {line} ({where})' for t, line, where in tags[:5])
                    more = f' and {len(tags) - 5} more' if len(tags) > 5 else ''
                    raise UnsafeYAMLError(
                        f'{key}: {path} holds YAML tag(s) that could run code or build Python objects: {listed}{more}. '
                        'krdistill reads option files with a safe YAML loader and refuses them before anything '
                        'runs; write plain values (strings, numbers, lists, mappings) instead.')
                return None if node is None else loader.construct_document(node)
            finally:
                loader.dispose()
    except OptionFileError as e:
        raise (e if str(e).startswith(f'{key}: ') else type(e)(f'{key}: {e}')) from None
    except UnicodeDecodeError as e:
        raise OptionFileError(f'{key}: {path} is not UTF-8 text (an option file is YAML): {e}') from None
    except yaml.YAMLError as e:
        raise OptionFileError(f'{key}: {path} is not valid YAML: {e}') from None
    except OSError as e:
        raise OptionFileError(f'{key}: cannot read {path}: {e.strerror or e}') from None


def load_options(path: str | os.PathLike, key: str = '-opt') -> OrderedDict:
    """:func:`load_yaml` for an option file: the top level must be a mapping of options."""
    opt = load_yaml(path, key)
    if not isinstance(opt, Mapping):
        what = 'is empty' if opt is None else f'holds a {type(opt).__name__}, not a mapping of options (name, ...)'
        raise OptionFileError(f'{key}: {path} {what}')
    return opt


# ------------------------------------------------------------------------------------------ checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint krdistill will not read or could not write; the message names the file and the
    option key that pointed to it."""


class NonFiniteError(CheckpointError):
    """A checkpoint holds a tensor with NaN or infinite values; it is not loaded (or written)."""


def nonfinite_tensors(obj: Any, prefix: str = '') -> list[str]:
    """Dotted names of the floating-point tensors in ``obj`` (nested dicts, lists and tuples) that
    hold a NaN or an infinite value, each with its count, e.g. ``'params.conv.weight (2 NaN of 432)'``."""
    bad, stack = [], [(prefix, obj)]
    while stack:
        name, x = stack.pop()
        if torch.is_tensor(x):
            if (x.is_floating_point() or x.is_complex()) and x.numel() and not bool(torch.isfinite(x).all()):
                nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                what = ', '.join(w for w in (f'{nan} NaN' if nan else '', f'{inf} inf' if inf else '') if w)
                bad.append(f'{name or "(the tensor)"} ({what} of {x.numel()})')
        elif isinstance(x, Mapping):
            stack.extend((f'{name}.{k}' if name else str(k), v) for k, v in reversed(list(x.items())))
        elif isinstance(x, (list, tuple)):
            stack.extend((f'{name}[{i}]', v) for i, v in reversed(list(enumerate(x))))
    return bad


def check_finite(obj: Any, path: str | os.PathLike, key: str, prefix: str = '', action: str = 'load') -> None:
    """Raise :class:`NonFiniteError` naming ``key``, the file and the tensors when ``obj`` holds a
    non-finite floating-point tensor (:func:`nonfinite_tensors`); ``action``: what is refused."""
    bad = nonfinite_tensors(obj, prefix)
    if bad:
        more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
        raise NonFiniteError(f'{key}: {path} holds non-finite values in {len(bad)} tensor(s): {", ".join(bad[:3])}'
                             f'{more}; krdistill will not {action} it (a diverged run? use an earlier checkpoint)')


def _read_error(e: BaseException, path: str, key: str) -> CheckpointError:
    """The error for a ``torch.load(..., weights_only=True)`` that failed: refused objects, or a file
    that is truncated, damaged or not a torch checkpoint. Never torch's advice to load unsafely."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and 'weights' in text.lower() and 'only' in text.lower():
        found = re.search(r'GLOBAL ([A-Za-z_][\w.]*)', text) or re.search(r'(Unsupported operand \S+)', text)
        what = f' (refused: {found.group(1)})' if found else ''
        return CheckpointError(
            f'{key}: {path} holds objects other than tensors, numbers, strings and containers{what}; krdistill loads '
            'checkpoints with torch.load(weights_only=True) and never unpickles them, so nothing in it was run. '
            'Give a file that holds tensors only (a BasicSR .pth: {"params": state_dict}).')
    first = text.strip().splitlines()[0][:200] if text.strip() else ''
    return CheckpointError(f'{key}: cannot read {path}: the file is truncated, damaged or not a torch checkpoint '
                           f'({type(e).__name__}{": " + first if first else ""})')


def load_checkpoint(path: str | os.PathLike, key: str = 'checkpoint', safe_globals: Iterable | None = None,
                    map_location: Any = 'cpu'):
    """``torch.load(path, map_location=map_location, weights_only=True)`` with errors that name ``key``.

    A missing file raises ``FileNotFoundError``; a truncated or damaged file, or one holding
    objects other than tensors and plain containers (never unpickled), :class:`CheckpointError`.
    Non-finite values are checked by the callers on what they load (:func:`check_finite`).
    ``safe_globals``: extra classes allowed while loading (e.g. mmengine's log buffers).
    """
    path = str(path)
    _check_is_file(path, key)
    ctx = torch.serialization.safe_globals(list(safe_globals)) if safe_globals else contextlib.nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, pickled code, a foreign format, ...)
        raise _read_error(e, path, key) from None


_WRITE_CAUSES = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is exceeded',
                 errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
                 errno.EPERM: 'permission denied'}


def write_error_cause(e: BaseException, folder: str) -> str:
    """Why a write into ``folder`` failed, in words: from ``errno``, or for torch's own writer
    (``RuntimeError: [enforce fail at inline_container.cc]``) from the folder's free space and access."""
    if isinstance(e, OSError) and e.errno in _WRITE_CAUSES:
        return _WRITE_CAUSES[e.errno]
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return 'the disk is full'
    except OSError:
        pass
    if osp.isdir(folder) and not os.access(folder, os.W_OK):
        return 'the folder is not writable (read-only or permission denied)'
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
    return f'{type(e).__name__}: {first}'


def save_checkpoint(obj: Any, path: str | os.PathLike, key: str) -> None:
    """``torch.save(obj, path)``; a failed write (a full or read-only disk) raises
    :class:`CheckpointError` naming ``key``, the file and the cause, with the partial file removed."""
    path = str(path)
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        cause = write_error_cause(e, osp.dirname(path) or '.')
        with contextlib.suppress(OSError):
            os.remove(path)
        raise CheckpointError(f'{key}: cannot write {path}: {cause}') from e


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
    loaded with the right shape: training against a mostly random teacher is never silent. A
    state holding a non-finite tensor is refused (:class:`NonFiniteError`).
    """
    ckpt = load_checkpoint(path, key, safe_globals)
    state = strip_prefix(state_dict_from(ckpt, param_key, str(path), key_param), prefix)
    if prefix and not state:
        raise KeyError(f'{key}: no key of {path} starts with {prefix!r}')
    check_finite(state, path, key, prefix=param_key if isinstance(param_key, str) and param_key != 'auto' else '')
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

"""Checks that run before the first iteration, so a broken data set fails at once with the key to fix.

One implementation, two callers: the dataset classes of :mod:`krdistill.data`
(``CheckedPairedImageDataset`` / ``CheckedSingleImageDataset`` run :func:`check_dataset` on their
own block when they are built, under any entry point, BasicSR's own ``basicsr/train.py``
included) and ``krdistill-train`` (:mod:`krdistill.entry` runs :func:`check_datasets` on every
``datasets.<phase>`` block before the first loader is built).

For each block on disk: every ``dataroot_*`` folder exists and holds images; paired folders hold
the same file names (or, with ``filename_tmpl`` / ``meta_info_file``, every GT image has its LR
image); every image passes a quick integrity check (PIL's ``verify``: header and PNG checksums, no
decoding); and the sizes of every LR/GT pair, read from the image headers, fit ``scale``: for
``phase: train`` the GT is exactly ``scale`` x the LR (BasicSR's random crop requires it); for
val/test the GT is at least ``scale`` x LR and less than ``scale`` x (LR + 1) in each dimension
(BasicSR crops the GT to ``scale`` x LR; more than that remainder means a wrong pairing or scale).
LMDB folders must hold ``meta_info.txt``; their sizes are read from it. Switch the image integrity
check off with ``datasets.<phase>.check_images: false`` (for example on very large sets already
known to be sound); the sizes are still checked (headers only).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from os import path as osp
from typing import Iterator

IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
ROOT_KEYS = ('dataroot_gt', 'dataroot_lq')

__all__ = ['check_dataset', 'check_datasets', 'remember_passed', 'IMG_EXTS']

#: fingerprints of the blocks that passed during a :func:`remember_passed` scope (None outside one)
_PASSED: set[str] | None = None


@contextlib.contextmanager
def remember_passed() -> Iterator[None]:
    """Within this scope a block that passed once is not checked again (same options, same process).

    ``krdistill-train`` checks every block before the loaders are built; the checked dataset
    classes built right after would otherwise read every image a second time.
    """
    global _PASSED
    if _PASSED is not None:  # nested: the outer scope owns the set
        yield
        return
    _PASSED = set()
    try:
        yield
    finally:
        _PASSED = None


def _fingerprint(ds: dict) -> str:
    return json.dumps(ds, sort_keys=True, default=str)


def _images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTS) and not f.startswith('.'))


def _inspect(path: str, verify: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the header and, with ``verify``, PIL's integrity check; (size, error)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            size = img.size
            if verify:
                img.verify()
    except Exception as e:  # noqa: BLE001  (any failure means unreadable)
        return None, f'{type(e).__name__}: {e}'
    return size, None


def _lmdb_sizes(root: str) -> dict[str, tuple[int, int]]:
    """key -> (width, height) from an LMDB folder's ``meta_info.txt`` (``name.png (h,w,c) level``)."""
    sizes = {}
    with open(osp.join(root, 'meta_info.txt')) as f:
        for line in f:
            m = re.match(r'\s*(\S+)\s+\((\d+),\s*(\d+)(?:,\s*\d+)?\)', line)
            if m:
                sizes[m.group(1).split('.')[0]] = (int(m.group(3)), int(m.group(2)))
    return sizes


def _check_size(key: str, phase: str, scale: int, gt: str, gt_size, lq: str, lq_size) -> None:
    (gw, gh), (lw, lh) = gt_size, lq_size
    where = f'check {key}.dataroot_gt / {key}.dataroot_lq and the top-level scale'
    if phase == 'train':
        if (gw, gh) != (scale * lw, scale * lh):
            raise ValueError(f'{key}: GT {gt} is {gw}x{gh} but its LR {lq} is {lw}x{lh}; for phase train the GT '
                             f'must be exactly scale ({scale}) x the LR, i.e. {scale * lw}x{scale * lh} ({where})')
    elif not (scale * lw <= gw < scale * (lw + 1) and scale * lh <= gh < scale * (lh + 1)):
        raise ValueError(f'{key}: GT {gt} is {gw}x{gh} but its LR {lq} is {lw}x{lh}; with scale {scale} the GT must '
                         f'be at least {scale * lw}x{scale * lh} and less than {scale * (lw + 1)}x{scale * (lh + 1)} '
                         f'(BasicSR crops the GT to scale x LR for {phase}; {where})')


def _gt_names(key: str, ds: dict, gt_files: list[str]) -> list[str]:
    """The GT file names BasicSR pairs: the ``meta_info_file`` list if given, else the folder's images."""
    meta = ds.get('meta_info_file')
    if meta is None:
        return gt_files
    if not osp.isfile(meta):
        raise FileNotFoundError(f'{key}.meta_info_file: no such file: {meta}')
    with open(meta) as f:
        names = [line.strip().split(' ')[0] for line in f if line.strip()]
    if not names:
        raise ValueError(f'{key}.meta_info_file: {meta} lists no images')
    missing = sorted(set(names) - set(gt_files))
    if missing:
        raise FileNotFoundError(f'{key}.meta_info_file: {len(missing)} listed image(s) are not in '
                                f'{key}.dataroot_gt {ds["dataroot_gt"]} (e.g. {missing[:5]})')
    return names


def check_dataset(phase: str, ds: dict, key: str | None = None) -> None:
    """Raise a clear error naming ``datasets.<phase>.<key>`` if the data set cannot be used.

    Args:
        phase: the key under ``datasets`` (``train``, ``val_1``, ...), for the messages.
        ds: the block as BasicSR hands it to the dataset (``phase`` and ``scale`` filled in by
            ``parse_options``; without ``scale`` the pair sizes are not checked). ``ds['phase']``
            (else ``phase``) decides the size rule: ``train`` exact, anything else cropped.
        key: where the block lives in the YAML, for the messages (default ``datasets.<phase>``;
            for instance ``meta.dataset``).
    """
    key = key or f'datasets.{phase}'
    if not isinstance(ds, dict):
        raise TypeError(f'{key}: must be a mapping, got {type(ds).__name__}')
    if _PASSED is not None and _fingerprint(ds) in _PASSED:
        return
    io_type = (ds.get('io_backend') or {}).get('type', 'disk')
    kind = str(ds.get('phase') or phase).split('_')[0]
    scale = ds.get('scale')
    verify = bool(ds.get('check_images', True))
    files = {}
    for root_key in ROOT_KEYS:
        root = ds.get(root_key)
        if root is None:
            continue
        if not isinstance(root, str):
            raise TypeError(f'{key}.{root_key}: must be a folder path, got {root!r}')
        if io_type == 'lmdb':
            if not osp.isfile(osp.join(root, 'meta_info.txt')):
                raise FileNotFoundError(f'{key}.{root_key}: {root} is not an LMDB folder (no meta_info.txt)')
            continue
        if io_type != 'disk':
            continue
        if not osp.isdir(root):
            raise FileNotFoundError(f'{key}.{root_key}: no such folder: {root}')
        found = _images(root)
        if not found:
            raise ValueError(f'{key}.{root_key}: no images in {root}')
        files[root_key] = found

    if io_type == 'lmdb' and all(ds.get(k) for k in ROOT_KEYS) and isinstance(scale, int):
        gt_sizes, lq_sizes = _lmdb_sizes(ds['dataroot_gt']), _lmdb_sizes(ds['dataroot_lq'])
        if set(gt_sizes) != set(lq_sizes):
            only = sorted(set(gt_sizes) ^ set(lq_sizes))[:5]
            raise ValueError(f'{key}: the LMDBs of dataroot_gt and dataroot_lq do not hold the same keys (e.g. {only})')
        for name, size in gt_sizes.items():
            _check_size(key, kind, scale, f'{ds["dataroot_gt"]}:{name}', size, f'{ds["dataroot_lq"]}:{name}',
                        lq_sizes[name])

    gt_size = ds.get('gt_size')
    if kind == 'train' and isinstance(scale, int) and isinstance(gt_size, int) and gt_size % scale:
        raise ValueError(f'{key}.gt_size: {gt_size} is not a multiple of the scale ({scale}); the LR crop would be '
                         f'{gt_size / scale:g} pixels (e.g. gt_size: {gt_size - gt_size % scale})')
    if len(files) == 2:  # paired folders: the pairs BasicSR builds, their integrity and sizes
        tmpl = ds.get('filename_tmpl', '{}')
        gt_root, lq_root = ds['dataroot_gt'], ds['dataroot_lq']
        if tmpl == '{}' and ds.get('meta_info_file') is None:
            gt, lq = set(files['dataroot_gt']), set(files['dataroot_lq'])
            if gt != lq:
                only = sorted(gt ^ lq)[:5]
                raise ValueError(f'{key}: dataroot_gt and dataroot_lq do not hold the same file names '
                                 f'({len(gt)} vs {len(lq)} images; e.g. {only})')
        lq_set = set(files['dataroot_lq'])
        pairs = []
        for name in _gt_names(key, ds, files['dataroot_gt']):
            base, ext = osp.splitext(name)
            lq_name = f'{tmpl.format(base)}{ext}'
            if lq_name not in lq_set:
                raise ValueError(f'{key}: GT {name} has no LR image {lq_name} in dataroot_lq {lq_root} '
                                 f'(check {key}.dataroot_lq / filename_tmpl {tmpl!r})')
            pairs.append((osp.join(gt_root, name), osp.join(lq_root, lq_name)))
        for gt_path, lq_path in pairs:
            sizes = []
            for root_key, p in (('dataroot_gt', gt_path), ('dataroot_lq', lq_path)):
                size, err = _inspect(p, verify)
                if err:
                    raise ValueError(f'{key}.{root_key}: corrupt or unreadable image {p} ({err})')
                sizes.append(size)
            if isinstance(scale, int):
                _check_size(key, kind, scale, gt_path, sizes[0], lq_path, sizes[1])
            if kind == 'train' and isinstance(gt_size, int) and sizes[0] and min(sizes[0]) < gt_size:
                raise ValueError(f'{key}.gt_size: {gt_size}, but GT {gt_path} is only {sizes[0][0]}x{sizes[0][1]}; '
                                 f'lower gt_size or leave that image out')
    else:  # one folder (e.g. SingleImageDataset): integrity only
        for root_key, names in files.items():
            if not verify:
                continue
            for name in names:
                p = osp.join(ds[root_key], name)
                _, err = _inspect(p, True)
                if err:
                    raise ValueError(f'{key}.{root_key}: corrupt or unreadable image {p} ({err})')
    if _PASSED is not None:
        _PASSED.add(_fingerprint(ds))


def check_datasets(opt: dict) -> None:
    """:func:`check_dataset` for every ``datasets.<phase>`` block of ``opt``."""
    for phase, ds in (opt.get('datasets') or {}).items():
        check_dataset(phase, ds)

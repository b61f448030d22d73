"""Checks that run before the first iteration, so a broken data set fails at once with the key to fix.

Called by the dataloader builder of ``basicsr.train`` (see :mod:`krdistill.compat`). For each
``datasets.<phase>`` on disk: every ``dataroot_*`` folder exists and holds images, paired
folders hold the same file names, and every image passes a quick integrity check (PIL's
``verify``: header and PNG checksums, no decoding). LMDB folders must hold ``meta_info.txt``.
Switch the image check off with ``datasets.<phase>.check_images: false`` (for example on
very large sets already known to be sound).
"""
from __future__ import annotations

import os
from os import path as osp

IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
ROOT_KEYS = ('dataroot_gt', 'dataroot_lq')


def _images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTS) and not f.startswith('.'))


def _verify(path: str) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001  (any failure means unreadable)
        return f'{type(e).__name__}: {e}'
    return None


def check_dataset(phase: str, ds: dict) -> None:
    """Raise a clear error naming ``datasets.<phase>.<key>`` if the data set cannot be used."""
    key = f'datasets.{phase}'
    if not isinstance(ds, dict):
        raise TypeError(f'{key}: must be a mapping, got {type(ds).__name__}')
    io_type = (ds.get('io_backend') or {}).get('type', 'disk')
    names = {}
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
        files = _images(root)
        if not files:
            raise ValueError(f'{key}.{root_key}: no images in {root}')
        names[root_key] = files
        if ds.get('check_images', True):
            for f in files:
                err = _verify(osp.join(root, f))
                if err:
                    raise ValueError(f'{key}.{root_key}: corrupt or unreadable image {osp.join(root, f)} ({err})')
    if len(names) == 2 and ds.get('filename_tmpl', '{}') == '{}' and 'meta_info_file' not in ds:
        gt, lq = set(names['dataroot_gt']), set(names['dataroot_lq'])
        if gt != lq:
            only = sorted(gt ^ lq)[:5]
            raise ValueError(f'{key}: dataroot_gt and dataroot_lq do not hold the same file names '
                             f'({len(gt)} vs {len(lq)} images; e.g. {only})')


def check_datasets(opt: dict) -> None:
    for phase, ds in (opt.get('datasets') or {}).items():
        check_dataset(phase, ds)

"""BasicSR's paired / single image datasets with the preflight checks and read errors that name the key.

YAML::

    datasets:
      train:
        name: DIV2K
        type: CheckedPairedImageDataset   # every option of PairedImageDataset, plus check_images
        dataroot_gt: datasets/DIV2K/DIV2K_train_HR_sub
        dataroot_lq: datasets/DIV2K/DIV2K_train_LR_bicubic/X4_sub
        io_backend: {type: disk}
        # check_images: false  # skip PIL's integrity check of every image (sizes are still checked)

``options_key`` (optional) names the block's place in the YAML for the messages (default
``datasets.<phase>``); a model that builds a dataset from elsewhere sets it (``meta.dataset``).

Building the dataset runs :func:`krdistill.preflight.check_dataset` on its block first (missing or
empty folders, unpaired names, corrupt images, LR/GT sizes that do not fit ``scale``), so a broken
data set fails before the first iteration with the key to fix instead of a ``ZeroDivisionError``
or an ``AssertionError`` deep in BasicSR. A sample that still cannot be read later (a file
changed on disk) raises an error naming the file, the dataset and ``datasets.<phase>.dataroot_*``
instead of ``'NoneType' object has no attribute 'astype'``.
"""
from __future__ import annotations

from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.data.single_image_dataset import SingleImageDataset

from ..preflight import check_dataset

__all__ = ['CheckedPairedImageDataset', 'CheckedSingleImageDataset']


def _unreadable(path) -> bool:
    """True if OpenCV cannot decode ``path`` (BasicSR reads images with ``cv2.imdecode``)."""
    import cv2
    import numpy as np
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return True
    return data.size == 0 or cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is None


def _options_key(opt: dict) -> str:
    """Where the block lives in the YAML: ``opt['options_key']`` if set (e.g. ``meta.dataset``), else
    ``datasets.<phase>``."""
    return str(opt.get('options_key') or f'datasets.{opt.get("phase", "?")}')


def _read_error(dataset, index: int, error: Exception, paths: dict) -> RuntimeError:
    """An error for a sample that failed to load: which file, which dataset, which YAML key."""
    opt = dataset.opt
    key = _options_key(opt)
    client = getattr(dataset, 'file_client', None)
    disk = (type(client.client).__name__ == 'HardDiskBackend' if client is not None
            else dataset.io_backend_opt.get('type', 'disk') == 'disk')
    bad = {k: p for k, p in paths.items() if disk and _unreadable(p)} or paths
    where = ', '.join(f'{p} ({key}.dataroot_{k})' for k, p in bad.items())
    return RuntimeError(f'{key} ({opt.get("name")}): cannot read sample {index}: {where}; '
                        f'is the file a valid image? {type(error).__name__}: {error}')


class CheckedPairedImageDataset(PairedImageDataset):
    """:class:`basicsr.data.paired_image_dataset.PairedImageDataset` that checks its block when built.

    Args:
        opt: the dataset block, as for ``PairedImageDataset`` (``phase`` and ``scale`` filled in by
            BasicSR's ``parse_options``), plus ``check_images`` (default true) and ``options_key``.
    """

    def __init__(self, opt: dict):
        check_dataset(str(opt.get('phase', 'train')), opt, key=_options_key(opt))
        super().__init__(opt)

    def __getitem__(self, index: int) -> dict:
        try:
            return super().__getitem__(index)
        except Exception as e:  # noqa: BLE001  (re-raised with the file and the key)
            p = self.paths[index] if 0 <= index < len(self.paths) else {}
            raise _read_error(self, index, e, {k: p[f'{k}_path'] for k in ('gt', 'lq') if f'{k}_path' in p}) from e


class CheckedSingleImageDataset(SingleImageDataset):
    """:class:`basicsr.data.single_image_dataset.SingleImageDataset` that checks its block when built.

    Args:
        opt: the dataset block, as for ``SingleImageDataset``, plus ``check_images`` (default true) and
            ``options_key``.
    """

    def __init__(self, opt: dict):
        check_dataset(str(opt.get('phase', 'test')), opt, key=_options_key(opt))
        super().__init__(opt)

    def __getitem__(self, index: int) -> dict:
        try:
            return super().__getitem__(index)
        except Exception as e:  # noqa: BLE001  (re-raised with the file and the key)
            p = self.paths[index] if 0 <= index < len(self.paths) else f'index {index}'
            raise _read_error(self, index, e, {'lq': p}) from e

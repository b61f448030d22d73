"""Dataset classes that check their own block when built (BasicSR's ``DATASET_REGISTRY``).

``CheckedPairedImageDataset`` and ``CheckedSingleImageDataset`` are BasicSR's
``PairedImageDataset`` / ``SingleImageDataset`` plus :func:`krdistill.preflight.check_dataset` on
their block in ``__init__`` and read errors that name the file, the dataset and the option key in
``__getitem__``. They are classes of their own (BasicSR's are untouched), so they behave the same
under every entry point: ``krdistill-train``, BasicSR's own ``basicsr/train.py`` / ``test.py``,
or a user's script. Importing this package registers them.
"""
from basicsr.utils.registry import DATASET_REGISTRY

from ..registry import register
from .checked_dataset import CheckedPairedImageDataset, CheckedSingleImageDataset

__all__ = ['CheckedPairedImageDataset', 'CheckedSingleImageDataset']

for _cls in (CheckedPairedImageDataset, CheckedSingleImageDataset):
    register(DATASET_REGISTRY, _cls)
del _cls

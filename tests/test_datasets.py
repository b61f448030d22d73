"""CheckedPairedImageDataset / CheckedSingleImageDataset: BasicSR's datasets plus the preflight of their
own block (krdistill/preflight.py) and read errors that name the file and the YAML key."""
import copy
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import write_pairs
from basicsr.data import build_dataset
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.data.single_image_dataset import SingleImageDataset
from basicsr.utils.registry import DATASET_REGISTRY

import krdistill.data  # noqa: F401  (registration)
from krdistill import preflight
from krdistill.data import CheckedPairedImageDataset, CheckedSingleImageDataset


def _opt(hr: Path, lr: Path, phase: str = 'train', scale: int = 2, **extra) -> dict:
    opt = dict(name='tiny', type='CheckedPairedImageDataset', dataroot_gt=str(hr), dataroot_lq=str(lr),
               io_backend=dict(type='disk'), phase=phase, scale=scale)
    if phase == 'train':
        opt.update(gt_size=16, use_hflip=True, use_rot=True)
    opt.update(extra)
    return opt


def _write(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path


def test_registered_beside_basicsr_classes_which_stay_untouched():
    assert DATASET_REGISTRY.get('CheckedPairedImageDataset') is CheckedPairedImageDataset
    assert DATASET_REGISTRY.get('CheckedSingleImageDataset') is CheckedSingleImageDataset
    assert DATASET_REGISTRY.get('PairedImageDataset') is PairedImageDataset
    assert PairedImageDataset.__getitem__.__module__ == 'basicsr.data.paired_image_dataset'
    assert SingleImageDataset.__getitem__.__module__ == 'basicsr.data.single_image_dataset'


@pytest.mark.parametrize('phase', ['train', 'val'])
def test_same_samples_as_basicsr(tmp_path, phase):
    hr, lr = write_pairs(tmp_path, n=3, size=32, scale=2)
    opt = _opt(hr, lr, phase)
    ours = build_dataset(opt)
    theirs = build_dataset(dict(opt, type='PairedImageDataset'))
    assert isinstance(ours, CheckedPairedImageDataset) and len(ours) == len(theirs) == 3
    for i in range(3):
        random.seed(i)
        a = ours[i]
        random.seed(i)
        b = theirs[i]
        assert a.keys() == b.keys()
        for k in ('lq', 'gt'):
            assert torch.equal(a[k], b[k])


def _empty_gt(root):
    hr, lr = write_pairs(root, n=2)
    for p in hr.iterdir():
        p.unlink()
    return _opt(hr, lr)


def _corrupt(root):
    hr, lr = write_pairs(root, n=2)
    (hr / 'img001.png').write_bytes((hr / 'img001.png').read_bytes()[:60])
    return _opt(hr, lr)


def _unpaired(root):
    hr, lr = write_pairs(root, n=2)
    (lr / 'img001.png').rename(lr / 'other.png')
    return _opt(hr, lr)


def _wrong_scale(root):
    hr, lr = write_pairs(root, n=2, size=32, scale=2)
    return _opt(hr, lr, scale=4)  # GT 32 is 2 x LR 16, not 4 x


def _one_lr_off_by_one(root):
    hr, lr = write_pairs(root, n=3, size=32, scale=2)
    _write(lr / 'img002.png', 15, 16)
    return _opt(hr, lr)


def _val_gt_too_large(root):
    _write(root / 'HR' / 'a.png', 34, 32)  # scale 2, LR 16: at most 33 (BasicSR crops to 32)
    _write(root / 'LR' / 'a.png', 16, 16)
    return _opt(root / 'HR', root / 'LR', 'val')


def _val_gt_too_small(root):
    _write(root / 'HR' / 'a.png', 31, 32)
    _write(root / 'LR' / 'a.png', 16, 16)
    return _opt(root / 'HR', root / 'LR', 'val')


def _missing_meta_info_name(root):
    hr, lr = write_pairs(root, n=2)
    (root / 'meta.txt').write_text('img000.png (32,32,3)\nimg007.png (32,32,3)\n')
    return _opt(hr, lr, meta_info_file=str(root / 'meta.txt'))


def _template_without_lr(root):
    hr, lr = write_pairs(root, n=2)
    return _opt(hr, lr, filename_tmpl='{}x2')


CASES = {
    'empty GT folder': (_empty_gt, ['datasets.train.dataroot_gt', 'no images']),
    'missing LR folder': (lambda r: _opt(write_pairs(r)[0], r / 'nope'), ['datasets.train.dataroot_lq', 'no such']),
    'corrupt image': (_corrupt, ['datasets.train.dataroot_gt', 'img001.png']),
    'unpaired names': (_unpaired, ['datasets.train', 'same file names']),
    'train GT not scale x LR': (_wrong_scale, ['datasets.train', 'exactly scale (4)', 'img000.png', 'dataroot_lq']),
    'one LR off by one': (_one_lr_off_by_one, ['img002.png', '15x16', '30x32']),
    'val GT too large': (_val_gt_too_large, ['datasets.val', '34x32', 'less than 34x34']),
    'val GT too small': (_val_gt_too_small, ['datasets.val', 'at least 32x32']),
    'meta_info_file lists a missing image': (_missing_meta_info_name, ['datasets.train.meta_info_file', 'img007.png']),
    'filename_tmpl without its LR': (_template_without_lr, ['img000x2.png', 'filename_tmpl']),
}


@pytest.mark.parametrize('case', CASES)
def test_broken_block_fails_when_built_naming_the_key(tmp_path, case):
    make, words = CASES[case]
    opt = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        build_dataset(opt)
    for w in words:
        assert w in str(e.value), f'{case}: {w!r} not in {e.value}'
    with pytest.raises(type(e.value)) as e2:  # one implementation: the preflight says the same
        preflight.check_dataset('train' if opt['phase'] == 'train' else 'val', copy.deepcopy(opt))
    assert str(e2.value) == str(e.value)


def test_val_gt_with_a_crop_remainder_passes(tmp_path):
    _write(tmp_path / 'HR' / 'a.png', 33, 35)  # BasicSR crops 33x35 to 32x34 for LR 16x17
    _write(tmp_path / 'LR' / 'a.png', 16, 17)
    ds = build_dataset(_opt(tmp_path / 'HR', tmp_path / 'LR', 'val'))
    assert tuple(ds[0]['gt'].shape) == (3, 34, 32)


def test_template_and_meta_info_pairs(tmp_path):
    hr, lr = write_pairs(tmp_path, n=3)
    for p in sorted(lr.iterdir()):
        p.rename(lr / f'{p.stem}x2{p.suffix}')
    assert len(build_dataset(_opt(hr, lr, filename_tmpl='{}x2'))) == 3
    (tmp_path / 'meta.txt').write_text('img000.png (32,32,3)\nimg002.png (32,32,3)\n')
    (hr / 'img001.png').write_bytes(b'not listed, not read')
    assert len(build_dataset(_opt(hr, lr, filename_tmpl='{}x2', meta_info_file=str(tmp_path / 'meta.txt')))) == 2


def test_unreadable_sample_names_file_dataset_and_key(tmp_path):
    hr, lr = write_pairs(tmp_path, n=2)
    ds = build_dataset(_opt(hr, lr, check_images=False))
    (lr / 'img001.png').write_bytes(b'garbage')  # changed on disk after the check
    with pytest.raises(RuntimeError) as e:
        ds[1]
    msg = str(e.value)
    assert 'img001.png' in msg and 'datasets.train.dataroot_lq' in msg and 'tiny' in msg
    assert str(hr / 'img001.png') not in msg  # the GT file is fine: only the culprit is named
    assert ds[0]['gt'].shape[-1] == 16


def test_check_images_false_skips_integrity_not_sizes(tmp_path):
    hr, lr = write_pairs(tmp_path, n=2)
    (hr / 'img001.png').write_bytes((hr / 'img001.png').read_bytes()[:60])  # header intact, data cut
    assert len(build_dataset(_opt(hr, lr, check_images=False))) == 2
    with pytest.raises(ValueError, match='exactly scale'):
        build_dataset(_opt(hr, lr, check_images=False, scale=4))


def test_options_key_names_the_block(tmp_path):
    hr, lr = write_pairs(tmp_path, n=2, size=32, scale=2)
    with pytest.raises(ValueError, match='meta.dataset: GT'):
        build_dataset(_opt(hr, lr, scale=4, options_key='meta.dataset'))


def test_single_image_dataset(tmp_path):
    _, lr = write_pairs(tmp_path, n=2)
    opt = dict(name='lq only', type='CheckedSingleImageDataset', dataroot_lq=str(lr), io_backend=dict(type='disk'),
               phase='test', scale=2)
    ds = build_dataset(opt)
    assert isinstance(ds, CheckedSingleImageDataset) and len(ds) == 2
    assert torch.equal(ds[0]['lq'], build_dataset(dict(opt, type='SingleImageDataset'))[0]['lq'])
    (lr / 'img001.png').write_bytes(b'garbage')
    with pytest.raises(RuntimeError, match=r'img001.png \(datasets.test.dataroot_lq\)'):
        ds[1]
    with pytest.raises(ValueError, match='datasets.test.dataroot_lq: corrupt or unreadable image'):
        build_dataset(opt)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match='datasets.test.dataroot_lq: no images'):
        build_dataset(dict(opt, dataroot_lq=str(empty)))


def test_lmdb_sizes_from_meta_info(tmp_path):
    for name, size in (('gt.lmdb', 32), ('lq.lmdb', 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'meta_info.txt').write_text(''.join(f'img00{i}.png ({size},{size},3) 1\n' for i in range(2)))
    opt = _opt(tmp_path / 'gt.lmdb', tmp_path / 'lq.lmdb', io_backend=dict(type='lmdb'))
    preflight.check_dataset('train', opt)
    with pytest.raises(ValueError, match='exactly scale'):
        preflight.check_dataset('train', dict(opt, scale=4))
    with pytest.raises(FileNotFoundError, match='datasets.train.dataroot_gt: .* is not an LMDB folder'):
        preflight.check_dataset('train', dict(opt, dataroot_gt=str(tmp_path)))


def test_a_block_is_read_once_per_pipeline(tmp_path, monkeypatch):
    hr, lr = write_pairs(tmp_path, n=2)
    opt = _opt(hr, lr)
    calls = []
    inspect = preflight._inspect
    monkeypatch.setattr(preflight, '_inspect', lambda p, v: calls.append(p) or inspect(p, v))
    with preflight.remember_passed():
        preflight.check_datasets({'datasets': {'train': opt}})
        build_dataset(opt)  # the same block: not read again
    assert len(calls) == 4
    build_dataset(opt)  # outside the scope: checked again
    assert len(calls) == 8

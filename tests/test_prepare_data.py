"""Data preparation: mod-crop, sub-images, LR sizes, LMDB, and bit-exact MATLAB bicubic."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import krdistill  # noqa: F401  (shims before basicsr)
from krdistill.data_utils import (extract_sub_images, image_names, matlab_imresize_uint8, mod_crop, prepare_folder,
                                  sub_image_positions)
from krdistill.io import read_image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('KRDISTILL_SHARED_DATA', REPO.parent / 'shared' / 'data'))
SCALES = (2, 3, 4)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', REPO / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_hr(folder: Path, shapes, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, shape in enumerate(shapes):
        name = f'img{i}.png'
        cv2.imwrite(str(folder / name), rng.integers(0, 256, shape, dtype=np.uint8))
        names.append(name)
    return names


# ---------------------------------------------------------------------------- unit behaviour
def test_mod_crop_keeps_top_left():
    img = np.arange(7 * 10 * 3, dtype=np.uint8).reshape(7, 10, 3)
    out = mod_crop(img, 4)
    assert out.shape == (4, 8, 3)
    np.testing.assert_array_equal(out, img[:4, :8])
    assert mod_crop(img[..., 0], 3).shape == (6, 9)


def test_sub_image_positions_like_basicsr():
    assert sub_image_positions(100, 48, 24) == [0, 24, 48, 52]  # end-flush crop added
    assert sub_image_positions(96, 48, 24) == [0, 24, 48]
    assert sub_image_positions(100, 48, 24, thresh_size=10) == [0, 24, 48]
    assert sub_image_positions(40, 48, 24) == []
    img = np.zeros((100, 96), np.uint8)
    assert len(extract_sub_images(img, 48, 24)) == 4 * 3


@pytest.mark.parametrize('shape', [(17, 23, 3), (16, 16), (9, 14, 4)])
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_matlab_resize_shapes_and_dtype(shape, scale):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = matlab_imresize_uint8(img, 1 / scale)
    assert out.dtype == np.uint8
    assert out.shape == (-(-shape[0] // scale), -(-shape[1] // scale)) + shape[2:]
    up = matlab_imresize_uint8(img, 2)
    assert up.shape == (2 * shape[0], 2 * shape[1]) + shape[2:]


def test_matlab_resize_constant_and_channels_independent():
    const = np.full((12, 12, 3), 200, np.uint8)
    np.testing.assert_array_equal(matlab_imresize_uint8(const, 1 / 4), const[:3, :3])
    img = np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    out = matlab_imresize_uint8(img, 1 / 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], matlab_imresize_uint8(img[..., c], 1 / 3))
    with pytest.raises(TypeError, match='uint8'):
        matlab_imresize_uint8(img.astype(np.float32), 0.5)


# ---------------------------------------------------------------------------- prepare_folder / tool
def test_prepare_folder_crops_and_lr_sizes(tmp_path):
    hr = tmp_path / 'HR'
    names = _write_hr(hr, [(50, 37, 3), (24, 36, 3), (30, 31)])
    out = tmp_path / 'out'
    written = prepare_folder(str(hr), str(out), scales=[2, 4])
    assert set(written) == {'GT', 'LRbicx2', 'LRbicx4'}
    for name in names:
        src = read_image(hr / name, color=False)
        gt = read_image(out / 'GT' / name, color=False)
        h, w = src.shape[:2]
        assert gt.shape[:2] == (h - h % 4, w - w % 4)  # multiple of lcm(2, 4)
        np.testing.assert_array_equal(gt, src[:gt.shape[0], :gt.shape[1]])
        for s in (2, 4):
            lr = read_image(out / f'LRbicx{s}' / name, color=False)
            assert lr.shape == (gt.shape[0] // s, gt.shape[1] // s) + gt.shape[2:]
            np.testing.assert_array_equal(lr, matlab_imresize_uint8(gt, 1 / s))  # PNG is lossless
    assert image_names(out / 'GT') == sorted(names)


def test_prepare_folder_sub_images(tmp_path):
    hr = tmp_path / 'HR'
    _write_hr(hr, [(50, 40, 3)])
    out = tmp_path / 'out'
    written = prepare_folder(str(hr), str(out), scales=[4], crop_size=24, step=12)
    # 48 x 40 after mod-crop: rows [0, 12, 24], cols [0, 12, 16]
    assert written['GT'] == [f'img0_s{i:03d}.png' for i in range(1, 10)]
    assert read_image(out / 'GT' / 'img0_s001.png', color=False).shape == (24, 24, 3)
    assert read_image(out / 'LRbicx4' / 'img0_s009.png', color=False).shape == (6, 6, 3)
    with pytest.raises(ValueError, match='multiples'):
        prepare_folder(str(hr), str(tmp_path / 'bad'), scales=[4], crop_size=30)


def test_prepare_data_cli_with_lmdb_readable_by_basicsr(tmp_path):
    from basicsr.utils import FileClient, imfrombytes
    hr = tmp_path / 'HR'
    names = _write_hr(hr, [(40, 36, 3), (26, 30, 3)])
    out = tmp_path / 'out'
    tool = _load_tool('prepare_data')
    assert tool.main(['-i', str(hr), '-o', str(out), '--scale', '2', '--lmdb', '-q']) == 0
    for folder in ('GT', 'LRbicx2'):
        db = out / f'{folder}.lmdb'
        assert (db / 'data.mdb').is_file()
        meta = (db / 'meta_info.txt').read_text().split('\n')
        assert [line.split()[0] for line in meta if line] == sorted(names)
    client = FileClient('lmdb', db_paths=[str(out / 'GT.lmdb'), str(out / 'LRbicx2.lmdb')],
                        client_keys=['gt', 'lq'])
    for name in names:
        key = Path(name).stem
        gt = imfrombytes(client.get(key, 'gt'), float32=False)
        lq = imfrombytes(client.get(key, 'lq'), float32=False)
        np.testing.assert_array_equal(gt, read_image(out / 'GT' / name, color=False))
        np.testing.assert_array_equal(lq, read_image(out / 'LRbicx2' / name, color=False))
    with pytest.raises(FileExistsError):  # basicsr would sys.exit; we raise
        prepare_folder(str(hr), str(out), scales=[2], lmdb=True)


def test_prepare_data_cli_basicsr_resize(tmp_path):
    hr = tmp_path / 'HR'
    _write_hr(hr, [(24, 24, 3)])
    tool = _load_tool('prepare_data')
    assert tool.main(['-i', str(hr), '-o', str(tmp_path / 'o'), '-s', '3', '--resize', 'basicsr', '-q']) == 0
    assert read_image(tmp_path / 'o' / 'LRbicx3' / 'img0.png', color=False).shape == (8, 8, 3)


# ---------------------------------------------------------------------------- MATLAB bit-exactness
def _reference_pairs(set_name: str, scale: int):
    root = SHARED_DATA / set_name
    gt_dir, lr_dir = root / f'GTmod{scale}', root / f'LRbicx{scale}'
    if not gt_dir.is_dir() or not lr_dir.is_dir():
        pytest.skip(f'reference data {set_name} x{scale} not found (set KRDISTILL_SHARED_DATA)')
    names = image_names(gt_dir)
    assert names, f'{gt_dir} is empty'
    return [(n, read_image(gt_dir / n, color=False), read_image(lr_dir / n, color=False)) for n in names]


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('set_name', ['Set5', 'Set14'])
def test_matlab_resize_bit_exact_on_reference_lr(set_name, scale):
    diffs = {}
    for name, gt, ref in _reference_pairs(set_name, scale):
        out = matlab_imresize_uint8(gt, 1 / scale)  # grayscale (bridge) stays H x W
        assert out.shape == ref.shape, name
        n = int(np.count_nonzero(out != ref))
        if n:
            diffs[name] = n
    assert not diffs, f'differing values per image: {diffs}'


def test_basicsr_imresize_is_not_bit_exact():
    """Documents why krdistill has its own resize: basicsr's keeps floats between passes."""
    from basicsr.utils.matlab_functions import imresize
    total = differ = 0
    for _, gt, ref in _reference_pairs('Set5', 4):
        out = imresize(gt.astype(np.float32) / 255., 1 / 4)
        out = np.clip(np.round(out * 255.), 0, 255).astype(np.uint8)
        assert out.shape == ref.shape
        total += ref.size
        differ += int(np.count_nonzero(out != ref))
    assert differ > 0.01 * total  # several percent of values differ (mostly by 1)


@pytest.mark.parametrize('set_name', ['Set5', 'Set14'])
def test_prepare_folder_reproduces_benchmark_layout(set_name, tmp_path):
    """HR -> GTmodS + LRbicxS with --per-scale-gt gives the stored benchmark files exactly."""
    root = SHARED_DATA / set_name
    if not (root / 'HR').is_dir():
        pytest.skip(f'reference data {set_name} not found (set KRDISTILL_SHARED_DATA)')
    tool = _load_tool('prepare_data')
    out = tmp_path / set_name
    assert tool.main(['-i', str(root / 'HR'), '-o', str(out), '-s', *map(str, SCALES), '--per-scale-gt',
                      '--compress-level', '1', '-q']) == 0
    for s in SCALES:
        for folder in (f'GTmod{s}', f'LRbicx{s}'):
            names = image_names(root / folder)
            assert image_names(out / folder) == names
            for name in names:
                np.testing.assert_array_equal(read_image(out / folder / name, color=False),
                                              read_image(root / folder / name, color=False), err_msg=f'{folder}/{name}')

"""SR data preparation: MATLAB-compatible bicubic resize, mod-crop, sub-images, LMDB.

The standard bicubic (BI) degradation of SR papers is MATLAB's ``imresize(gt, 1/S,
'bicubic')`` on a uint8 image. :func:`matlab_imresize_uint8` reproduces it bit-exactly:

* cubic kernel with ``a = -0.5``, widened by ``1/scale`` when downscaling (antialiasing);
* sample positions ``u = x/scale + 0.5*(1 - 1/scale)`` (1-based ``x``);
* taps outside the image take the edge pixel (replicate);
* one separable pass along the height (rows), then one along the width; each pass is
  rounded half away from zero and clipped to uint8, as MATLAB does for uint8 input.

``basicsr.utils.matlab_functions.imresize`` is close but not bit-exact: it keeps floats
between the two passes and mirrors instead of replicating edges. It is kept available as
``resize='basicsr'`` in :func:`prepare_folder`.

The resize needs only numpy; image files go through :mod:`krdistill.io`. BasicSR is imported lazily for the
``basicsr`` resize and LMDB writing.
"""
from __future__ import annotations

import math
import os
import os.path as osp
from typing import Callable, Iterable, Sequence

import numpy as np

from . import io
from .resize import contributions, cubic

__all__ = [
    'cubic', 'contributions', 'matlab_imresize_uint8', 'basicsr_imresize_uint8', 'resize_uint8', 'lr_size',
    'mod_crop', 'sub_image_positions', 'extract_sub_images', 'image_names', 'prepare_folder', 'write_lmdb'
]


# --------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic resize
# --------------------------------------------------------------------------------------------
def _round_clip_uint8(x: np.ndarray) -> np.ndarray:
    # MATLAB's double -> uint8 conversion: round half away from zero, saturate.
    return np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), 0, 255).astype(np.uint8)


def _resize_axis_uint8(img: np.ndarray, axis: int, out_length: int, scale: float,
                       antialiasing: bool) -> np.ndarray:
    weights, indices = contributions(img.shape[axis], out_length, scale, 4.0, antialiasing)
    src = np.moveaxis(img, axis, 0).astype(np.float64)
    shape = (out_length, ) + (1, ) * (src.ndim - 1)
    acc = np.zeros((out_length, ) + src.shape[1:], dtype=np.float64)
    for k in range(weights.shape[1]):  # taps in order, as MATLAB accumulates them
        acc += weights[:, k].reshape(shape) * src[indices[:, k]]
    return np.moveaxis(_round_clip_uint8(acc), 0, axis)


def _out_length(in_length: int, scale: float) -> int:
    # ceil(in * scale), tolerant of 1/3 not being exact in binary floating point.
    return int(math.ceil(in_length * scale - 1e-9))


def matlab_imresize_uint8(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on a uint8 image, bit-exact.

    Args:
        img: ``H x W`` or ``H x W x C`` uint8 array (any channel order; channels are independent).
        scale: resize factor as in MATLAB (``1/4`` downscales by 4, ``2`` upscales by 2).
        antialiasing: widen the kernel when downscaling (MATLAB's default, True).

    Returns:
        uint8 array of ``ceil(H*scale) x ceil(W*scale)`` (x C).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f'matlab_imresize_uint8 expects a uint8 image, got {img.dtype}')
    if img.ndim not in (2, 3):
        raise ValueError(f'expected an H x W or H x W x C image, got shape {img.shape}')
    if scale <= 0:
        raise ValueError(f'scale must be positive, got {scale}')
    out_h, out_w = _out_length(img.shape[0], scale), _out_length(img.shape[1], scale)
    out = _resize_axis_uint8(img, 0, out_h, scale, antialiasing)  # rows (height) first, rounded
    return _resize_axis_uint8(out, 1, out_w, scale, antialiasing)  # then columns, rounded


def basicsr_imresize_uint8(img: np.ndarray, scale: float) -> np.ndarray:
    """BasicSR's ``imresize`` on ``img/255``, rounded back to uint8 (near-MATLAB, not exact)."""
    import krdistill  # noqa: F401  (shims before basicsr)
    from basicsr.utils.matlab_functions import imresize
    out = imresize(np.asarray(img).astype(np.float32) / 255., scale)
    return np.clip(np.round(out * 255.), 0, 255).astype(np.uint8)


RESIZERS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    'matlab': matlab_imresize_uint8,
    'basicsr': basicsr_imresize_uint8,
}


def resize_uint8(img: np.ndarray, scale: float, method: str = 'matlab') -> np.ndarray:
    """Resize a uint8 image with ``method`` in ``RESIZERS`` (``'matlab'`` or ``'basicsr'``)."""
    if method not in RESIZERS:
        raise ValueError(f'unknown resize method {method!r}; choose from {sorted(RESIZERS)}')
    return RESIZERS[method](img, scale)


def lr_size(h: int, w: int, scale: int) -> tuple[int, int]:
    """LR size of a mod-cropped ``h x w`` HR image downscaled by integer ``scale``."""
    return h // scale, w // scale


# --------------------------------------------------------------------------------------------
# Cropping
# --------------------------------------------------------------------------------------------
def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the top-left ``H - H % scale`` x ``W - W % scale`` region (BasicSR's ``mod_crop``)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale, ...]


def sub_image_positions(length: int, crop_size: int, step: int, thresh_size: int = 0) -> list[int]:
    """Start positions of sub-images along one side, as BasicSR's ``extract_subimages``.

    Crops start every ``step`` pixels; a last crop flush with the end is added when more than
    ``thresh_size`` pixels would otherwise be left uncovered. A side shorter than ``crop_size``
    gives no position.
    """
    if length < crop_size:
        return []
    pos = list(range(0, length - crop_size + 1, step))
    if length - (pos[-1] + crop_size) > thresh_size:
        pos.append(length - crop_size)
    return pos


def extract_sub_images(img: np.ndarray, crop_size: int, step: int,
                       thresh_size: int = 0) -> list[np.ndarray]:
    """Sub-images in BasicSR's order (rows of crops, top to bottom); index ``i`` is named
    ``<stem>_s{i+1:03d}``."""
    h, w = img.shape[:2]
    return [img[y:y + crop_size, x:x + crop_size, ...]
            for y in sub_image_positions(h, crop_size, step, thresh_size)
            for x in sub_image_positions(w, crop_size, step, thresh_size)]


# --------------------------------------------------------------------------------------------
# I/O and folder preparation
# --------------------------------------------------------------------------------------------
def image_names(folder: str | os.PathLike) -> list[str]:
    """Sorted image file names (not paths) directly in ``folder`` (:func:`krdistill.io.list_images`)."""
    return [p.name for p in io.list_images(folder)]


def _lmdb_size_bound(path: str) -> int:
    size = 10 * osp.getsize(path)
    try:
        from PIL import Image
        with Image.open(path) as im:  # reads the header only
            size = max(size, 2 * im.width * im.height * len(im.getbands()))
    except Exception:  # noqa: BLE001  (PIL absent or unknown format: the file-size bound stays)
        pass
    return size + 8192


def write_lmdb(folder: str, lmdb_path: str, compress_level: int = 1) -> str:
    """Pack every image of ``folder`` into ``lmdb_path`` (BasicSR layout, keys = file stems).

    Uses ``basicsr.utils.lmdb_util.make_lmdb_from_imgs``; the result holds ``data.mdb`` and
    ``meta_info.txt`` and reads with BasicSR's ``lmdb`` file client.
    """
    import krdistill  # noqa: F401  (shims before basicsr)
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"lmdb path must end with '.lmdb', got {lmdb_path}")
    if osp.exists(lmdb_path):  # basicsr would sys.exit(1) here
        raise FileExistsError(f'{lmdb_path} already exists; remove it or choose another output folder')
    names = image_names(folder)
    if not names:
        raise FileNotFoundError(f'no images in {folder}')
    keys = [osp.splitext(n)[0] for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f'{folder}: file stems are not unique, cannot use them as LMDB keys')
    # basicsr sizes the map from the first image only, which overflows when that one is the
    # smallest; bound every image instead (the map is a sparse reservation, not disk use).
    map_size = sum(_lmdb_size_bound(osp.join(folder, n)) for n in names) + (64 << 20)
    make_lmdb_from_imgs(folder, lmdb_path, names, keys, compress_level=compress_level,
                        multiprocessing_read=False, map_size=map_size)
    return lmdb_path


def prepare_folder(hr_folder: str, out_folder: str, scales: Sequence[int] = (4, ), resize: str = 'matlab',
                   crop_size: int | None = None, step: int | None = None, thresh_size: int = 0,
                   lmdb: bool = False, gt_name: str = 'GT', lr_template: str = 'LRbicx{scale}',
                   per_scale_gt: bool = False, gt_template: str = 'GTmod{scale}', compress_level: int = 3,
                   names: Iterable[str] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Make an SR training/test folder from HR images.

    Each HR image is cropped top-left to a multiple of ``lcm(scales)``, so that one GT serves
    every scale; with ``crop_size`` it is further cut into ``crop_size`` sub-images every
    ``step`` pixels (``crop_size`` and ``step`` must then be multiples of every scale). The GT
    goes to ``<out>/<gt_name>``, its downscaled copies to ``<out>/LRbicx{S}`` with the same
    file names (sub-images are named ``<stem>_s001.png`` ... as in BasicSR). Output is PNG.

    With ``per_scale_gt`` each scale gets its own GT, cropped to a multiple of that scale only,
    in ``<out>/GTmod{S}``: the benchmark layout (Set5/Set14 ``GTmodS`` + ``LRbicxS``). Several
    scales sharing one ``lcm`` crop give LR images of other sizes than the benchmark's.

    Args:
        hr_folder: folder of HR images (8-bit, colour or grayscale).
        out_folder: output root.
        scales: integer downscaling factors.
        resize: ``'matlab'`` (bit-exact MATLAB bicubic, default) or ``'basicsr'``.
        crop_size: optional sub-image size in GT pixels.
        step: sub-image stride (default ``crop_size``).
        thresh_size: as BasicSR's ``extract_subimages``: add a last, end-flush crop when more
            than this many pixels remain.
        lmdb: also pack each output folder into ``<out>/<folder>.lmdb``.
        gt_name: name of the shared GT folder.
        lr_template: LR folder name, formatted with ``scale``.
        per_scale_gt: one GT folder per scale (``gt_template``) instead of a shared one.
        gt_template: per-scale GT folder name, formatted with ``scale``.
        compress_level: PNG compression level of written files.
        names: restrict to these file names of ``hr_folder``.
        log: optional callable for progress lines.

    Returns:
        ``{folder name: [written file names]}`` for every GT and LR folder.
    """
    scales = [int(s) for s in scales]
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f'scales must be positive integers, got {scales}')
    if len(set(scales)) != len(scales):
        raise ValueError(f'scales repeat: {scales}')
    if resize not in RESIZERS:
        raise ValueError(f'unknown resize method {resize!r}; choose from {sorted(RESIZERS)}')
    if per_scale_gt:  # (GT folder, crop multiple, scales it serves)
        groups = [(gt_template.format(scale=s), s, [s]) for s in scales]
    else:
        groups = [(gt_name, math.lcm(*scales), scales)]
    if crop_size is not None:
        step = step or crop_size
        mod = math.lcm(*scales)
        if crop_size % mod or step % mod:
            raise ValueError(f'crop_size ({crop_size}) and step ({step}) must be multiples of every scale '
                             f'{scales} (of {mod}) so that LR crops align with GT crops')
    names = list(names) if names is not None else image_names(hr_folder)
    if not names:
        raise FileNotFoundError(f'no images in {hr_folder}')
    lr_names = {s: lr_template.format(scale=s) for s in scales}
    written: dict[str, list[str]] = {}
    for gt_folder, _, group_scales in groups:
        written[gt_folder] = []
        for s in group_scales:
            written[lr_names[s]] = []
    for name in names:
        hr = io.read_image(osp.join(hr_folder, name), color=False)  # gray stays gray
        stem = osp.splitext(name)[0]
        for gt_folder, mod, group_scales in groups:
            img = mod_crop(hr, mod)
            if crop_size is None:
                items = [(stem + '.png', img)]
            else:
                subs = extract_sub_images(img, crop_size, step, thresh_size)
                items = [(f'{stem}_s{i + 1:03d}.png', sub) for i, sub in enumerate(subs)]
            for out_name, gt in items:
                io.write_image(osp.join(out_folder, gt_folder, out_name), gt, compress_level)
                written[gt_folder].append(out_name)
                for s in group_scales:
                    lr = resize_uint8(gt, 1 / s, resize)
                    io.write_image(osp.join(out_folder, lr_names[s], out_name), lr, compress_level)
                    written[lr_names[s]].append(out_name)
            if log:
                log(f'{name} -> {gt_folder}: {len(items)} image(s) of '
                    f'{items[0][1].shape[1]}x{items[0][1].shape[0]}' if items else
                    f'{name} -> {gt_folder}: smaller than crop size {crop_size}, skipped')
    if lmdb:
        for folder in written:
            write_lmdb(osp.join(out_folder, folder), osp.join(out_folder, folder + '.lmdb'))
    return written

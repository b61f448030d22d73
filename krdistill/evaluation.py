"""Evaluate SR networks on image folders with BasicSR's metrics (Y-channel PSNR/SSIM, BT.601).

Protocol: LR input given (reference files) or made with MATLAB-compatible bicubic, SR output
rounded to uint8, border = scale removed, no self-ensemble. Used by the demo, the benchmark
and ``tools/evaluate.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch import nn

import krdistill  # noqa: F401  (shims before basicsr)
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize

IMG_EXTS = ('.png', '.bmp', '.jpg', '.jpeg', '.tif', '.tiff')


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 BGR H x W x 3 (grayscale is replicated to 3 channels)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f'cannot read image {path} (missing or not a valid image file)')
    if img.dtype != np.uint8:
        raise ValueError(f'{path}: only 8-bit images are supported, got {img.dtype}')
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[..., :3]
    return img


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'no such folder: {folder}')
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTS)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (top-left kept)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic downscale of a uint8 image (exact MATLAB rounding when available)."""
    try:
        from krdistill.data_utils import matlab_imresize_uint8
    except ImportError:  # pragma: no cover - fallback to basicsr's near-match
        out = imresize(hr.astype(np.float64) / 255., 1 / scale)
        return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    return matlab_imresize_uint8(hr, 1 / scale)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscaling (the 'bicubic' baseline row), uint8 in and out."""
    out = imresize(lr.astype(np.float64) / 255., scale)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


@torch.no_grad()
def super_resolve(net: nn.Module, lr: np.ndarray, device: str | torch.device = 'cpu') -> np.ndarray:
    """Run ``net`` on a uint8 BGR image; returns the uint8 BGR SR image."""
    x = torch.from_numpy(np.ascontiguousarray(lr[:, :, ::-1].transpose(2, 0, 1))).float().div(255.)
    was_training = net.training
    net.eval()
    out = net(x[None].to(device))[0].clamp(0, 1).cpu().numpy()
    net.train(was_training)
    return (out.transpose(1, 2, 0)[:, :, ::-1] * 255.).round().astype(np.uint8)


def y_psnr_ssim(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[float, float]:
    """Y-channel PSNR and SSIM with ``border`` pixels removed (BasicSR's metrics)."""
    if sr.shape != hr.shape:
        raise ValueError(f'SR {sr.shape} and HR {hr.shape} differ in shape')
    psnr = calculate_psnr(sr, hr, crop_border=border, input_order='HWC', test_y_channel=True)
    ssim = calculate_ssim(sr, hr, crop_border=border, input_order='HWC', test_y_channel=True)
    return float(psnr), float(ssim)


def load_pairs(hr_dir: str | os.PathLike, scale: int, lr_dir: str | os.PathLike | None = None) -> list[dict]:
    """HR images (mod-cropped) with their LR: read from ``lr_dir`` (same file names) when given,
    otherwise made with MATLAB-compatible bicubic."""
    pairs = []
    for hr_path in list_images(hr_dir):
        hr = mod_crop(read_image(hr_path), scale)
        if lr_dir is not None:
            lr = read_image(Path(lr_dir) / hr_path.name)
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise ValueError(f'{Path(lr_dir) / hr_path.name}: LR {lr.shape[:2]} x{scale} does not match '
                                 f'HR {hr.shape[:2]} (after cropping to a multiple of {scale})')
        else:
            lr = bicubic_downscale(hr, scale)
        pairs.append(dict(name=hr_path.stem, hr=hr, lr=lr))
    if not pairs:
        raise FileNotFoundError(f'no images in {hr_dir}')
    return pairs


def evaluate(net: nn.Module | None, pairs: Sequence[dict], scale: int, device='cpu') -> dict:
    """Per-image and mean Y-PSNR/SSIM of ``net`` (``None``: bicubic upscaling)."""
    rows = []
    for p in pairs:
        sr = bicubic_upscale(p['lr'], scale) if net is None else super_resolve(net, p['lr'], device)
        psnr, ssim = y_psnr_ssim(sr, p['hr'], border=scale)
        rows.append(dict(name=p['name'], psnr=psnr, ssim=ssim))
    return dict(images=rows, psnr=float(np.mean([r['psnr'] for r in rows])),
                ssim=float(np.mean([r['ssim'] for r in rows])))


def markdown_table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    header = list(header)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)

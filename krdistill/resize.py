"""MATLAB's bicubic kernel and its per-dimension contributions (numpy only, framework-free).

Shared by the bit-exact data preparation (:mod:`krdistill.data_utils`) and DUKD's zoom-out
(:mod:`krdistill.upcycle`), which must use the same kernel as the data.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ['cubic', 'contributions']


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``), float64."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    return ((1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) +
            (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2)))


def contributions(in_length: int, out_length: int, scale: float, kernel_width: float = 4.0,
                  antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices of each output sample along one dimension.

    Follows MATLAB's ``imresize>contributions`` with replicated edges.

    Args:
        in_length: input length.
        out_length: output length.
        scale: resize factor (``< 1`` downscales).
        kernel_width: support of the cubic kernel (4).
        antialiasing: widen the kernel by ``1/scale`` when downscaling.

    Returns:
        ``(weights, indices)``, both ``out_length x P``; weights are float64 and each row sums
        to 1, indices are clipped into ``[0, in_length - 1]``.
    """
    if scale < 1 and antialiasing:
        def kernel(x):
            return scale * cubic(scale * x)
        kernel_width = kernel_width / scale
    else:
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    p = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(p, dtype=np.float64)[None, :]
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    keep = np.any(weights != 0, axis=0)  # MATLAB drops all-zero tap columns
    weights, indices = weights[:, keep], indices[:, keep]
    indices = np.clip(indices.astype(np.int64) - 1, 0, in_length - 1)  # 1-based -> 0-based, replicate
    return weights, indices

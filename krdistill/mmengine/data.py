"""Synthetic SR pairs for configs and tests (torch only), registered as ``SyntheticSRDataset``."""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

__all__ = ['SyntheticSRDataset', 'synthetic_pair']


def synthetic_pair(index: int, gt_size: int = 32, scale: int = 2, seed: int = 0, channels: int = 3):
    """Deterministic HR/LR pair ``index``: a smooth colour field with sharp steps, and its
    antialiased bicubic x``scale`` reduction. Values in [0, 1]; shapes ``C x H x W``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    coarse = torch.rand(1, channels, max(gt_size // 8, 2), max(gt_size // 8, 2), generator=gen)
    hr = F.interpolate(coarse, size=(gt_size, gt_size), mode='bicubic', align_corners=False)
    steps = (torch.rand(1, 1, gt_size, 1, generator=gen) > 0.5).float().expand(-1, channels, -1, gt_size)
    hr = (0.7 * hr + 0.3 * steps).clamp(0, 1)
    lq = F.interpolate(hr, scale_factor=1 / scale, mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)
    return lq[0], hr[0]


class SyntheticSRDataset(Dataset):
    """``num`` synthetic pairs, each a dict ``{'lq': C x h x w, 'gt': C x (h*scale) x (w*scale)}``.

    Use with ``collate_fn=dict(type='default_collate')`` so a batch is ``{'lq': B x ..., 'gt': B x ...}``.
    """

    def __init__(self, num: int = 16, gt_size: int = 32, scale: int = 2, seed: int = 0, channels: int = 3):
        if gt_size % scale:
            raise ValueError(f'SyntheticSRDataset: gt_size ({gt_size}) must be a multiple of scale ({scale})')
        self.num, self.gt_size, self.scale, self.seed, self.channels = num, gt_size, scale, seed, channels
        self.metainfo = dict(scale=scale)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        lq, gt = synthetic_pair(index, self.gt_size, self.scale, self.seed, self.channels)
        return {'lq': lq, 'gt': gt}

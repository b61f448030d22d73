"""A tiny EDSR-like SR network for configs and tests (torch only), registered as ``MetaKDTinyEDSR``.

Real runs use your own teacher and student: any network registered in mmengine's ``MODELS`` (or,
with BasicSR installed, any ``type`` of BasicSR's ARCH_REGISTRY, e.g. ``EDSR``, ``RCAN``).
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ['TinyEDSR']


class TinyEDSR(nn.Module):
    """``conv_first -> body.<i> (residual blocks) -> conv_after_body (+ skip) -> pixel-shuffle``.

    Args:
        num_in_ch, num_out_ch: image channels. Default 3.
        num_feat: feature width. Default 16.
        num_block: residual blocks ``body.0 .. body.<num_block-1>`` (distillation points). Default 2.
        upscale: scale factor. Default 2.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 16, num_block: int = 2,
                 upscale: int = 2) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.body = nn.ModuleList(
            nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(num_feat, num_feat, 3, padding=1)) for _ in range(num_block))
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(num_feat, num_out_ch * upscale**2, 3, padding=1),
                                      nn.PixelShuffle(upscale))

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv_first(x)
        res = feat
        for block in self.body:
            res = res + block(res)
        return self.upsample(self.conv_after_body(res) + feat)

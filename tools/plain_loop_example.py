"""MetaKD in a plain PyTorch training loop: no BasicSR, no mmengine, torch only.

    python tools/plain_loop_example.py [--iters 20] [--teacher-iters 30] [--mode exact|finite_difference]
    python tools/plain_loop_example.py --method dukd      # output KD with DUKD's data upcycling

A tiny EDSR-like teacher is first fitted for a few iterations on synthetic x2 pairs (stand-in for
your trained teacher), then a thinner student is trained with :class:`krdistill.metakd.MetaKD`:
texture-wise distillation through a KRNet, and a meta update of the KRNet before each student step.
The iteration is :meth:`krdistill.metakd.MetaKD.train_step`, the code BasicSR's ``MetaKDModel`` runs.
``--method dukd`` trains the student with output KD and data upcycling (zoom-in, zoom-out,
label-consistency augmentations) through :meth:`krdistill.distiller.Distiller.train_step`, the code
BasicSR's ``KDSRModel`` runs.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from krdistill.build import build_distiller, build_metakd, build_optimizer


class TinyEDSR(nn.Module):
    """head conv -> ``body.<i>`` residual blocks -> conv_after_body (+ skip) -> pixel-shuffle upsampler."""

    def __init__(self, num_feat: int = 16, num_block: int = 2, upscale: int = 2):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, padding=1), nn.ReLU(True),
                                                  nn.Conv2d(num_feat, num_feat, 3, padding=1))
                                    for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(num_feat, 3 * upscale**2, 3, padding=1), nn.PixelShuffle(upscale))

    def forward(self, x):
        feat = self.conv_first(x)
        res = feat
        for block in self.body:
            res = res + block(res)
        return self.upsample(self.conv_after_body(res) + feat)


def synthetic_batch(batch: int = 4, size: int = 32, scale: int = 2, gen: torch.Generator | None = None):
    """Smooth random colour fields with sharp steps (HR) and their bicubic x``scale`` reductions (LR)."""
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=gen)
    hr = F.interpolate(coarse, size=(size, size), mode='bicubic', align_corners=False)
    steps = (torch.rand(batch, 1, size, 1, generator=gen) > 0.5).float().expand(-1, 3, -1, size)
    hr = (0.7 * hr + 0.3 * steps).clamp(0, 1)
    lq = F.interpolate(hr, scale_factor=1 / scale, mode='bicubic', antialias=True, align_corners=False)
    return lq.clamp(0, 1), hr


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=20, help='student iterations (default 20)')
    parser.add_argument('--teacher-iters', type=int, default=30, help='teacher warm-up iterations (default 30)')
    parser.add_argument('--mode', default='exact', choices=['exact', 'finite_difference'], help='meta.mode')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--method', default='metakd', choices=['metakd', 'dukd'],
                        help='metakd (default) or dukd: output KD with data upcycling')
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    teacher = TinyEDSR(num_feat=16, num_block=2)                   # stand-in for a trained teacher
    opt_t = torch.optim.Adam(teacher.parameters(), 2e-3)
    for _ in range(args.teacher_iters):
        lq, gt = synthetic_batch(gen=gen)
        opt_t.zero_grad()
        F.l1_loss(teacher(lq), gt).backward()
        opt_t.step()

    # ---- the plain loop a user writes -------------------------------------------------------
    student = TinyEDSR(num_feat=8, num_block=1)
    if args.method == 'dukd':
        return _dukd_loop(teacher, student, args, gen)
    mkd = build_metakd(teacher, student, teacher_layers=['body.1'], student_layers=['body.0'],
                       network_kr=dict(type='KRNet', width=8, num_kernels=4, hidden=16),
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                       pixel_opt=dict(type='L1Loss', loss_weight=1.0),
                       meta=dict(every=1, mode=args.mode))   # the rest: the recommended defaults
    opt_s = torch.optim.Adam(student.parameters(), 2e-3)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-3), mkd.kr_parameters())
    logs = {}
    for it in range(1, args.iters + 1):
        lq, gt = synthetic_batch(gen=gen)
        step = mkd.train_step(lq, gt, opt_s, opt_kr)                # meta update, then the student step
        logs = step.logs                                            # step.skipped: why a step was not taken
        print(f'iter {it:3d}  ' + '  '.join(f'{k} {v.item():.4f}' for k, v in logs.items() if k != 't_meta'))
    # checkpoint: torch.save({'student': student.state_dict(), 'opt_s': opt_s.state_dict(),
    #                         'opt_kr': opt_kr.state_dict(),
    #                         'metakd': mkd.training_state_dict()}, path)   # KRNets, meta fallback state
    # -----------------------------------------------------------------------------------------
    return {k: float(v) for k, v in logs.items()}


def _dukd_loop(teacher, student, args, gen) -> dict:
    dist = build_distiller(teacher, student, output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                           pixel_opt=dict(type='L1Loss', loss_weight=1.0),
                           upcycle_opt=dict(zoom_in=1, zoom_out=True, aug_prob=0.3))  # steps: 1 (one step)
    opt_s = torch.optim.Adam(student.parameters(), 2e-3)
    logs = {}
    for it in range(1, args.iters + 1):
        lq, gt = synthetic_batch(gen=gen)
        logs = dist.train_step(lq, gt, opt_s).logs                 # l_pix, l_kd_out, l_zoom_in, l_zoom_out_*
        print(f'iter {it:3d}  ' + '  '.join(f'{k} {v.item():.4f}' for k, v in logs.items()))
    return {k: float(v) for k, v in logs.items()}


if __name__ == '__main__':
    main()

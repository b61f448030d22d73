#!/usr/bin/env python
r"""What credit does each loss term get under each meta objective? (MetaKD research tool)

A student (EDSR 16/4, x4) is trained with FitNet + output KD from the CPU teacher; at several
points of that run, for each loss term ``k`` (output KD, FitNet, a texture term of a KRNet at its
initialisation), we measure the hypergradient ``credit_k = -d L_meta / d lambda_k`` of the
term's weight under several meta objectives:

=================  =========================================================================
``sgd1/train``     one plain virtual step ``theta - lr g``; meta loss: pixel L1 on the next
                   training batch (MetaKD's first design)
``adam1/train``    one virtual step equal to the student's real Adam step
                   (``krdistill.meta.optimizer_step``); next training batch
``adam1/val``      same step; pixel L1 on a held-out batch (``--val``: images no method trains on)
``adam1/teacher``  same step; L1 to the teacher's output on the held-out batch
``accT/train``     the displacement each term caused over the last T real steps,
                   ``Z_k = sum_s J_s g_{k,s}`` (``J_s``: Jacobian of Adam's step in the gradient;
                   the Hessian of the trajectory is ignored, as in first-order online
                   hypergradients), against ``-grad L_meta`` on the next training batch
``accT/val``       the same against the held-out pixel loss
=================  =========================================================================

Credits are printed in units of 1e-6 (mean, standard error over the measurements, share of
positive signs) with the cosine between ``-grad L_meta`` and the term's displacement. Settings
are chosen on the held-out images, never on Set5 / Set14.

    python tools/meta_credit.py --data-root ../shared/data --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth \
        --val <root>/skval/HR [--warmup 300 --measure 6 --window 50 --out credit.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __name__ == '__main__':
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

STUDENT = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=4, upscale=4, res_scale=1,
               img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])
TEACHER = dict(STUDENT, num_feat=64, num_block=16)
OBJECTIVES = ('sgd1/train', 'adam1/train', 'adam1/val', 'adam1/teacher', 'accT/train', 'accT/val')
TERMS = ('l_kd_out', 'l_kd_fitnet', 'l_texture')


class Patches:
    """Random aligned HR/LR patch pairs (area-weighted image choice, one of 8 flips) from HR images;
    LR by the MATLAB-exact bicubic of krdistill.data_utils."""

    def __init__(self, paths, scale=4, gt=96, seed=0):
        from krdistill.data_utils import matlab_imresize_uint8, mod_crop
        from krdistill.io import read_image
        self.hr, self.lr = [], []
        for p in paths:
            hr = mod_crop(read_image(p), scale)
            if min(hr.shape[:2]) < gt:  # too small for one patch (a few T91 images)
                continue
            self.hr.append(hr)
            self.lr.append(matlab_imresize_uint8(hr, 1 / scale))
        area = np.array([h.shape[0] * h.shape[1] for h in self.hr], np.float64)
        self.p = area / area.sum()
        self.scale, self.gt = scale, gt
        self.rng = np.random.default_rng(seed)

    def batch(self, n=16):
        s, g = self.scale, self.gt
        lqs, gts = [], []
        for _ in range(n):
            i = self.rng.choice(len(self.hr), p=self.p)
            lr = self.lr[i]
            y = self.rng.integers(0, lr.shape[0] - g // s + 1)
            x = self.rng.integers(0, lr.shape[1] - g // s + 1)
            a, b = lr[y:y + g // s, x:x + g // s], self.hr[i][y * s:y * s + g, x * s:x * s + g]
            t = self.rng.integers(8)
            if t & 1:
                a, b = a[:, ::-1], b[:, ::-1]
            if t & 2:
                a, b = a[::-1], b[::-1]
            if t & 4:
                a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
            lqs.append(a)
            gts.append(b)

        def tensor(xs):
            arr = np.ascontiguousarray(np.stack(xs)[..., ::-1]).astype(np.float32) / 255.
            return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        return tensor(lqs), tensor(gts)


def _images(folder):
    from krdistill.io import list_images
    return list_images(folder)


def _term_grads(dist, krterm, lq, gt, teacher, params):
    """Per-term gradients of the student's parameters (pixel, output KD, FitNet, texture)."""
    out_t, feats_t = teacher
    sr, feats_s = dist.student_forward(lq)
    terms = dist.pixel_terms(sr, gt)
    terms.update(dist.kd_terms(sr, feats_s, out_t, feats_t))
    terms['l_texture'] = krterm(feats_s[0], feats_t[0])
    grads = {}
    for k, v in terms.items():
        gs = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        grads[k] = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]
    return terms, grads


def _meta_grad(student, params, names, loss_fn):
    from torch.func import functional_call
    theta = {n: p.detach().requires_grad_(True) for n, p in zip(names, params)}
    loss = loss_fn(lambda x: functional_call(student, theta, (x, )))
    return [g.detach() for g in torch.autograd.grad(loss, [theta[n] for n in names])]


def _dot(a, b):
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _norm(a):
    return math.sqrt(max(_dot(a, a), 0.0))


def run(args) -> dict:
    from basicsr.archs import build_network

    import krdistill  # noqa: F401  (registration)
    from krdistill.archs.krnet_arch import KRNet
    from krdistill.build import build_distiller
    from krdistill.io import load_weights
    from krdistill.losses.texture_loss import TextureWiseLoss
    from krdistill.meta import optimizer_step
    from krdistill.metakd import KRTextureTerm
    torch.set_num_threads(args.threads)
    root = Path(args.data_root)
    train_paths = [p for d in ('T91/HR', 'BSD200/HR') for p in _images(root / d) if p.name != '302003.png']
    train = Patches(train_paths, seed=args.seed)
    val = Patches(_images(args.val), seed=args.seed + 1)
    torch.manual_seed(args.seed)
    teacher = build_network(dict(TEACHER))
    load_weights(teacher, args.teacher, 'params', True)
    student = build_network(dict(STUDENT))
    dist = build_distiller(teacher, student, ['body.15'], ['body.3'], kd_opt=dict(type='FitNetLoss', loss_weight=1.0),
                           output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                           pixel_opt=dict(type='L1Loss', loss_weight=1.0))
    krterm = KRTextureTerm(KRNet(16, 64, hidden=16), TextureWiseLoss(criterion='charbonnier', eps=0.01))
    opt = torch.optim.Adam(list(student.parameters()) + dist.kd_parameters(), lr=args.lr, betas=(0.9, 0.99))
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    params = [p for p in student.parameters() if p.requires_grad]
    l1 = torch.nn.functional.l1_loss
    records = {o: {k: [] for k in TERMS} for o in OBJECTIVES}
    t0 = time.time()
    total = args.warmup + args.measure * args.window
    acc = None
    it = 0
    while it < total:
        it += 1
        lq, gt = train.batch()
        teacher_out = dist.teacher_forward(lq)
        in_window = it > args.warmup
        if in_window:
            if acc is None:
                acc = {k: [torch.zeros_like(p) for p in params] for k in TERMS}
            _, grads = _term_grads(dist, krterm, lq, gt, teacher_out, params)
            step = optimizer_step(opt, student.named_parameters())
            g_all = [sum(grads[k][i] for k in ('l_pix', 'l_kd_out', 'l_kd_fitnet')) for i in range(len(params))]
            theta = {n: p.detach() for n, p in zip(names, params)}
            for k in TERMS:  # J_s g_k: forward-mode derivative of Adam's step in the gradient
                _, tangent = torch.func.jvp(lambda *g: tuple(step(theta, dict(zip(names, g)))[n] for n in names),
                                            tuple(g_all), tuple(grads[k]))
                acc[k] = [a + t for a, t in zip(acc[k], tangent)]
        step_result = dist.train_step(lq, gt, opt, teacher=teacher_out)
        assert step_result.skipped is None, step_result.skipped
        if in_window and (it - args.warmup) % args.window == 0:
            _measure(dist, krterm, student, names, params, opt, train, val, teacher, records, acc, l1)
            acc = None
            print(f'  it {it}/{total}: measured ({time.time() - t0:.0f} s)', flush=True)
    return summarize(records, args, time.time() - t0)


def _measure(dist, krterm, student, names, params, opt, train, val, teacher, records, acc, l1):
    from krdistill.meta import optimizer_step
    lq, gt = train.batch()
    teacher_out = dist.teacher_forward(lq)
    _, grads = _term_grads(dist, krterm, lq, gt, teacher_out, params)
    lq_n, gt_n = train.batch()
    lq_v, gt_v = val.batch()
    with torch.no_grad():
        t_v = teacher(lq_v)
    metas = {'train': lambda f: l1(f(lq_n), gt_n), 'val': lambda f: l1(f(lq_v), gt_v),
             'teacher': lambda f: l1(f(lq_v), t_v)}
    lam = torch.ones(len(TERMS), requires_grad=True)
    base = [sum(grads[k][i] for k in ('l_pix', )) for i in range(len(params))]
    step = optimizer_step(opt, student.named_parameters())
    theta = {n: p.detach() for n, p in zip(names, params)}
    lr = opt.param_groups[0]['lr']
    from torch.func import functional_call
    for obj in ('sgd1/train', 'adam1/train', 'adam1/val', 'adam1/teacher'):
        kind, meta = obj.split('/')
        g = [b + sum(lam[j] * grads[k][i] for j, k in enumerate(TERMS)) for i, b in enumerate(base)]
        if kind == 'sgd1':
            new = {n: theta[n] - lr * gi for n, gi in zip(names, g)}
        else:
            new = step(theta, dict(zip(names, g)))
        loss = metas[meta](lambda x: functional_call(student, new, (x, )))
        (d_lam, ) = torch.autograd.grad(loss, [lam])
        for j, k in enumerate(TERMS):
            records[obj][k].append(dict(credit=-float(d_lam[j]), cos=None))
    for meta in ('train', 'val'):
        gm = _meta_grad(student, params, names, metas[meta])
        for k in TERMS:
            z = acc[k]
            c = -_dot(gm, z)
            records[f'accT/{meta}'][k].append(dict(credit=c, cos=c / max(_norm(gm) * _norm(z), 1e-30)))


def summarize(records, args, seconds) -> dict:
    out = {'settings': vars(args), 'seconds': seconds, 'credit': {}}
    lines = ['| objective | ' + ' | '.join(TERMS) + ' |', '|---|' + '---|' * len(TERMS)]
    for obj in OBJECTIVES:
        row = [obj]
        out['credit'][obj] = {}
        for k in TERMS:
            c = np.array([r['credit'] for r in records[obj][k]]) * 1e6
            cos = [r['cos'] for r in records[obj][k] if r['cos'] is not None]
            se = c.std(ddof=1) / math.sqrt(len(c)) if len(c) > 1 else float('nan')
            out['credit'][obj][k] = dict(mean=float(c.mean()), se=float(se), positive=float((c > 0).mean()),
                                         cos=float(np.mean(cos)) if cos else None, n=len(c))
            cell = f'{c.mean():+.3g} ± {se:.2g} ({(c > 0).mean():.0%} +)'
            if cos:
                cell += f', cos {np.mean(cos):+.3f}'
            row.append(cell)
        lines.append('| ' + ' | '.join(row) + ' |')
    out['table'] = '\n'.join(lines)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--data-root', required=True, help='folder with T91/HR and BSD200/HR')
    p.add_argument('--teacher', required=True, help='the EDSR 64/16 x4 teacher checkpoint')
    p.add_argument('--val', required=True, help='held-out HR images (tools/make_val_images.py)')
    p.add_argument('--warmup', type=int, default=300, help='FitNet + output KD iterations before measuring')
    p.add_argument('--measure', type=int, default=6, help='number of measurements')
    p.add_argument('--window', type=int, default=50, help='T: real steps accumulated per measurement')
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', help='write the result as JSON here')
    args = p.parse_args(argv)
    res = run(args)
    print(res['table'])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    main()

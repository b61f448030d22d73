#!/usr/bin/env python
r"""Draw what a MetaKD run's KRNets transfer, for one image, as PNG.

    python tools/kr_picture.py -opt options/metakd_edsr_x4.yml --image butterfly_LRx4.png \
        [--experiment experiments/<name>] [--iter latest] [--hr] --out kr.png

For each distillation point: the N dynamic kernels with their weights, the student's texture maps
``T_s^n``, the teacher's ``T_t^n`` and ``|T_s^n - T_t^n|`` at the chosen checkpoint, then the
per-texture weights of *this image* over training: the KRNet and student of every saved checkpoint
(``models/net_kr_<iter>.pth`` beside ``net_g_<iter>.pth``) up to the chosen one, re-run on the image.
The option file is the training one (``network_g``, ``network_t``, ``network_kr``, ``kd``,
``path.pretrain_network_t``, ``train.texture_opt``); the experiment folder defaults to
``experiments/<name>``, as BasicSR writes it. ``--hr``: the image is a HR image, downscaled by the
option file's ``scale`` (MATLAB bicubic) before it goes in. Nothing is trained or downloaded.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

if __name__ == '__main__':  # run as a file: add the checkout (krdistill)
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def saved_iterations(models: Path) -> list[int]:
    """Iterations with both ``net_kr_<iter>.pth`` and ``net_g_<iter>.pth`` in ``models``, ascending."""
    its = []
    for p in models.glob('net_kr_*.pth'):
        m = re.fullmatch(r'net_kr_(\d+)\.pth', p.name)
        if m and (models / f'net_g_{m.group(1)}.pth').is_file():
            its.append(int(m.group(1)))
    return sorted(its)


def build(opt: dict, teacher_path: str | None = None):
    """The :class:`~krdistill.metakd.MetaKD` of a MetaKDModel option file (teacher loaded; the
    student and KRNets at their initialisation: load checkpoints into ``.student`` / ``.krnets``)."""
    from krdistill.build import BASICSR_KEYS, build_metakd
    from krdistill.evaluation import build_network
    from krdistill.io import load_weights
    for key in ('network_g', 'network_t', 'network_kr', 'kd'):
        if not opt.get(key):
            raise KeyError(f'{key}: the option file has no {key} block (a MetaKDModel training option file is needed)')
    path_opt = opt.get('path') or {}
    teacher_path = teacher_path or path_opt.get('pretrain_network_t')
    if not teacher_path:
        raise ValueError('path.pretrain_network_t: not set in the option file; pass --teacher')
    teacher = build_network(opt['network_t'])
    load_weights(teacher, teacher_path, path_opt.get('param_key_t', 'params'), True, key='path.pretrain_network_t')
    student = build_network(opt['network_g'])
    train_opt = opt.get('train') or {}
    return build_metakd(teacher.eval(), student, opt['kd'].get('teacher_layers', ()), opt['kd'].get('student_layers', ()),
                        network_kr=opt['network_kr'], texture_opt=train_opt.get('texture_opt'),
                        pixel_opt=train_opt.get('pixel_opt'), keys=BASICSR_KEYS)


def load_iteration(mkd, models: Path, it: int) -> None:
    from krdistill.io import load_weights
    load_weights(mkd.student, models / f'net_g_{it}.pth', 'params', True, key='--experiment')
    load_weights(mkd.krnets, models / f'net_kr_{it}.pth', 'params', True, key='--experiment')


def image_weights(mkd, lq) -> dict[str, list[float]]:
    """Per point: the KRNet's per-texture weights (texture gain included) on ``lq``."""
    from krdistill.kr_picture import texture_weights
    return texture_weights(mkd, lq)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-opt', '--option', required=True, help='the MetaKDModel training option file (YAML)')
    p.add_argument('--image', required=True, help='an LR image (or HR with --hr)')
    p.add_argument('--hr', action='store_true', help='the image is HR: bicubic-downscale it by the option scale')
    p.add_argument('--experiment', default=None, help='the run folder (default experiments/<name>)')
    p.add_argument('--iter', default='latest', help='checkpoint iteration to draw (default: the last saved)')
    p.add_argument('--teacher', default=None, help='teacher checkpoint (default: path.pretrain_network_t)')
    p.add_argument('--out', default=None, help='PNG to write (default <experiment>/visualization/kr_<iter>_<image>.png)')
    a = p.parse_args(argv)

    import torch
    from krdistill.evaluation import bicubic_downscale, mod_crop
    from krdistill.io import load_options, read_image, write_image
    from krdistill.kr_picture import draw_points

    opt = load_options(a.option, '-opt')  # krdistill's safe YAML loader: a Python tag is refused
    exp = Path(a.experiment) if a.experiment else Path('experiments') / str(opt.get('name', ''))
    models = exp / 'models'
    its = saved_iterations(models) if models.is_dir() else []
    if not its:
        raise FileNotFoundError(f'{models}: no net_kr_<iter>.pth with its net_g_<iter>.pth (--experiment: the run '
                                'folder BasicSR wrote, with logger.save_checkpoint_freq checkpoints)')
    if a.iter == 'latest':
        it = its[-1]
    else:
        it = int(a.iter)
        if it not in its:
            raise ValueError(f'--iter {it}: no checkpoint pair for it in {models} (saved: {its})')

    img = read_image(a.image)  # H x W x 3 BGR uint8
    if a.hr:
        scale = int(opt.get('scale', 4))
        img = bicubic_downscale(mod_crop(img, scale), scale)
    lq = torch.from_numpy(img[..., ::-1].astype('float32').transpose(2, 0, 1).copy()).unsqueeze(0) / 255.0

    mkd = build(opt, a.teacher)
    history = {name: [] for name in mkd.student_layers}
    for i in [i for i in its if i <= it]:
        load_iteration(mkd, models, i)
        for name, w in image_weights(mkd, lq).items():
            history[name].append(w)
    load_iteration(mkd, models, it)
    picture = draw_points(mkd, lq, history)
    out = Path(a.out) if a.out else exp / 'visualization' / f'kr_{it}_{Path(a.image).stem}.png'
    out.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, picture)
    print(f'{out}  ({picture.shape[1]}x{picture.shape[0]}; iteration {it}, weights over {len(its[:its.index(it) + 1])} '
          f'checkpoints)')
    return out


if __name__ == '__main__':
    main()

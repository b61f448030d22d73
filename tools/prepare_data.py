#!/usr/bin/env python
r"""Make an SR data folder from HR images: ``<out>/GT`` and ``<out>/LRbicx{S}``.

The GT is the HR image cropped top-left to a multiple of the scales (of all of them, or of
each one into ``GTmod{S}`` with ``--per-scale-gt``) and optionally cut into sub-images like
BasicSR's ``extract_subimages``; each LR is MATLAB-compatible bicubic
(bit-exact ``imresize(gt, 1/S)``) unless ``--resize basicsr``. File names are kept (output
is PNG). ``--lmdb`` also packs each folder into ``<out>/<folder>.lmdb`` (BasicSR layout).

Examples::

    python tools/prepare_data.py -i datasets/DIV2K/HR -o datasets/DIV2K_prep --scale 4
    python tools/prepare_data.py -i Set14/HR -o datasets/Set14 --scale 2 3 4 --per-scale-gt
    python tools/prepare_data.py -i T91/HR -o datasets/T91 --scale 2 3 4 \
        --crop-size 96 --step 48 --lmdb
"""
from __future__ import annotations

import argparse
import sys

import krdistill  # noqa: F401  (shims before basicsr)
from krdistill.data_utils import RESIZERS, prepare_folder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-i', '--input', required=True, help='folder of HR images')
    p.add_argument('-o', '--output', required=True, help='output root (GT/ and LRbicx{S}/ are made in it)')
    p.add_argument('-s', '--scale', type=int, nargs='+', default=[4],
                   help='downscaling factor(s); the GT is cropped to a multiple of all of them (default 4)')
    p.add_argument('--resize', choices=sorted(RESIZERS), default='matlab',
                   help="'matlab': bit-exact MATLAB bicubic (default); 'basicsr': basicsr's imresize, rounded")
    p.add_argument('--crop-size', type=int, default=None, help='cut GT into sub-images of this size')
    p.add_argument('--step', type=int, default=None, help='sub-image stride (default: crop size)')
    p.add_argument('--thresh-size', type=int, default=0,
                   help='add an end-flush crop when more than this many pixels remain (BasicSR; default 0)')
    p.add_argument('--lmdb', action='store_true', help='also write <folder>.lmdb for every output folder')
    p.add_argument('--gt-name', default='GT', help='name of the shared GT folder (default GT)')
    p.add_argument('--per-scale-gt', action='store_true',
                   help='one GT per scale, cropped to a multiple of that scale only, in GTmod{S}/ '
                   '(the Set5/Set14 benchmark layout); default: one GT/ cropped to a multiple of all scales')
    p.add_argument('--compress-level', type=int, default=3, help='PNG compression level (default 3)')
    p.add_argument('-q', '--quiet', action='store_true', help='no per-image log')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    written = prepare_folder(args.input, args.output, scales=args.scale, resize=args.resize,
                             crop_size=args.crop_size, step=args.step, thresh_size=args.thresh_size,
                             lmdb=args.lmdb, gt_name=args.gt_name, per_scale_gt=args.per_scale_gt, compress_level=args.compress_level,
                             log=None if args.quiet else print)
    for folder, files in written.items():
        print(f'{folder}: {len(files)} images')
    return 0


if __name__ == '__main__':
    sys.exit(main())

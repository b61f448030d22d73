#!/usr/bin/env python
r"""Write the held-out validation images of the benchmark's settings sweeps (BENCHMARKS.md, "Choosing
MetaKD's settings"): eight images that scikit-image ships (no download), cropped to a multiple of the
scale, as PNG (BGR, gray images as three equal channels).

    python tools/make_val_images.py <root>/skval/HR [--scale 4]

They are in neither the benchmark's training data (T91, BSD200) nor its test sets (Set5, Set14);
``options/bench/sweeps/*.yml`` evaluate on them as the set ``skval``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == '__main__':  # run as a file: tools/ (krbench) is sys.path[0]; add the checkout (krdistill)
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VAL_IMAGES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'immunohistochemistry', 'brick', 'grass')


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', help='output folder (created)')
    p.add_argument('--scale', type=int, default=4, help='crop to a multiple of this (default 4)')
    a = p.parse_args(argv)
    from krbench.demo import skimage_image
    from krdistill.evaluation import mod_crop
    from krdistill.io import write_image
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in VAL_IMAGES:
        img = mod_crop(skimage_image(name), a.scale)
        path = out / f'{name}.png'
        write_image(path, img)
        written.append(path)
        print(f'{path}  {img.shape[1]}x{img.shape[0]}')
    return written


if __name__ == '__main__':
    main()

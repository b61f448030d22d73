#!/usr/bin/env python
"""Evaluate SR checkpoints (or a whole benchmark run folder) on a folder of HR images.

Y-channel PSNR/SSIM (BT.601, BasicSR metrics), border = scale, no self-ensemble; HR cropped to
a multiple of the scale; LR made with MATLAB-compatible bicubic, or read with ``--lr-dir``.
Logic: :func:`krdistill.evaluation.main` (also the ``krdistill-evaluate`` console script): exit
code 0 on success, 1 when an input cannot be evaluated, 2 on a usage error.

Examples::

    python tools/evaluate.py net_g_latest.pth -opt options/test/test_student_edsr_x4.yml \\
        --hr-dir <data>/Set14/GTmod4 --lr-dir <data>/Set14/LRbicx4 --scale 4 --json set14.json
    python tools/evaluate.py experiments/bench_cpu_x4 --hr-dir <data>/Urban100/HR --scale 4 --bicubic
    python tools/evaluate.py student.pth --preset edsr-f16b4-x4 --hr-dir <folder> --scale 4
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from krdistill.evaluation import main  # noqa: E402  (imports krdistill first: shims before basicsr)

if __name__ == '__main__':
    sys.exit(main())

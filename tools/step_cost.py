#!/usr/bin/env python
"""Step cost of each distillation method: seconds per training iteration and peak memory, as
ratios to the student alone measured in the same run (logic: :mod:`krdistill.step_cost`).

Examples::

    python tools/step_cost.py --threads 2 --json step_cost.json            # CPU pair, all methods
    python tools/step_cost.py --preset edsr-l --device cuda --gt-size 192    # EDSR-L -> EDSR on a GPU
    python tools/step_cost.py --methods output_kd metakd_exact_every1 --iters 4 --warmup 1
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from krdistill.step_cost import main  # noqa: E402  (imports krdistill first: shims before basicsr)

if __name__ == '__main__':
    main()

#!/usr/bin/env python
"""Step cost of each distillation method: seconds per training iteration and peak memory, as
ratios to the student alone measured in the same run (logic: ``tools/krbench/step_cost.py``).

Examples::

    python tools/step_cost.py --threads 2 --json step_cost.json            # CPU pair, all methods
    python tools/step_cost.py --preset edsr-l --device cuda --gt-size 192    # EDSR-L -> EDSR on a GPU
    python tools/step_cost.py --methods output_kd metakd_exact_every1 --iters 4 --warmup 1
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tools/ (the krbench package) and the checkout (krdistill)

from krbench.step_cost import main  # noqa: E402

if __name__ == '__main__':
    main()

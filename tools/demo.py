#!/usr/bin/env python
"""Demo: tiny teacher, student alone and distilled students on scikit-image's sample images.

    python tools/demo.py [--root .] [--total-iter N] [--verbose]

The logic lives in ``tools/krbench/demo.py``.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tools/ (the krbench package) and the checkout (krdistill)

from krbench.demo import main  # noqa: E402

if __name__ == '__main__':
    main()

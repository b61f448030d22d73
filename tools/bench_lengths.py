#!/usr/bin/env python
"""Gaps against training length: the benchmark's rows at several run lengths, resumable
(logic: ``tools/krbench/lengths.py``).

Example (BENCHMARKS.md, "Gaps against training length")::

    python tools/bench_lengths.py -opt options/bench/cpu_x4_lengths.yml --data-root ../shared/data \\
        --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth --out experiments/lengths_cpu_x4
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tools/ (the krbench package) and the checkout (krdistill)

from krbench.lengths import main  # noqa: E402

if __name__ == '__main__':
    main()

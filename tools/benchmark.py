#!/usr/bin/env python
"""MetaKD vs hand-crafted KD benchmark, one command, resumable (logic: ``tools/krbench/benchmark.py``).

Example (the CPU protocol of BENCHMARKS.md; ~90 min on a 2-core machine)::

    python tools/benchmark.py -opt options/bench/cpu_x4.yml --data-root ../shared/data \\
        --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth --out experiments/bench_cpu_x4

A second call with the same ``--out`` reuses the patch pool, the teacher cache, the plan and
every finished run.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tools/ (the krbench package) and the checkout (krdistill)

from krbench.benchmark import main  # noqa: E402

if __name__ == '__main__':
    main()

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # tests/helpers.py
# tools/: the applications (the krbench package: benchmark, step cost, demo; the tool scripts). Appended, so
# that a tool script's name (evaluate.py, benchmark.py, ...) never shadows an installed package.
sys.path.append(os.path.join(os.path.dirname(_HERE), 'tools'))
os.environ.setdefault('OMP_NUM_THREADS', '1')

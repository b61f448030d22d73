import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py
os.environ.setdefault('OMP_NUM_THREADS', '1')

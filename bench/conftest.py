import os
import sys

# The benchmarks share bench/common.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

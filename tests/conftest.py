"""Shared pytest configuration.

Tests keep torch to few threads: CI has 2 cores and several test processes may run at once.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

"""The test suite (see README, Tests).

NumPy's OpenBLAS runs on one thread, here and in every process the tests start (they inherit the environment;
this module runs before conftest.py imports NumPy): its idle threads spin, and on a 2-core machine that already
runs API replicas, workers, redis-server and tinygrad they take the CPU from the work itself. The norms of one
signal step (reconcile.signal_scales) took 19.7 ms with the default threads, 0.13 ms with one.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

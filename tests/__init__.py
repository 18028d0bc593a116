"""The test suite (see README, Tests).

NumPy's OpenBLAS runs on one thread, here and in every process the tests start (they inherit the environment;
this module runs before conftest.py imports NumPy): its idle threads spin, and on a 2-core machine that already
runs API replicas, workers, redis-server and tinygrad they take the CPU from the work itself. The norms of one
signal step (reconcile.signal_scales) took 19.7 ms with the default threads, 0.13 ms with one.

The API processes the tests start run on tinygrad's heuristic kernels (MPSERVE_KERNEL_TABLE=off): a graph the
shipped table covers compiles in the engine's thread, one kernel after another, 17 s more per start of the
shipped model. tests/unit/test_kernel_table.py holds the table to its promises, in an engine thread as the API's.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPSERVE_KERNEL_TABLE", "off")

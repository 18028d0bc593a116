"""The test suite (see README, Tests).

NumPy's OpenBLAS runs on one thread here and in every process the tests start (they inherit the environment):
its worker threads spin while they wait, and on a 2-core machine that already runs API replicas, workers,
redis-server and tinygrad they take the CPU from the work itself. Measured on the CI-sized machine: the norms
of one signal step (reconcile.signal_scales) 19.7 ms with the default threads, 0.13 ms with one. This module
runs before conftest.py imports NumPy, so the setting reaches this process too.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

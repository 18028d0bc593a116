"""The test suite (see README, Tests). Two settings for every process the tests start (they inherit the
environment); this module runs before conftest.py imports NumPy or tinygrad, so they reach this process too.

- NumPy's OpenBLAS on one thread: its idle threads spin, and on a 2-core machine that already runs API replicas,
  workers, redis-server and tinygrad they take the CPU from the work itself. The norms of one signal step
  (reconcile.signal_scales) took 19.7 ms with the default threads, 0.13 ms with one.
- tinygrad lowers kernels in process (PARALLEL=0) instead of in a pool of spawned processes, each of which
  imports tinygrad again and is replaced every 16 kernels: on 2 cores the pool costs more than it saves
  (test_engine's per-path check: 32-34 s with the pool, 22-23 s without; the same kernels either way).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("PARALLEL", "0")

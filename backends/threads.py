"""The thread pool of the numba kernels and oneDNN's bf16 GEMMs, chosen once, at import, before any
parallel region starts (numba and libgomp read these settings when their threads start).

oneDNN's GEMMs run on GNU OpenMP, and so do numba's kernels here (its "omp" threading layer): the two
share one pool of threads, which spin 10,000 rounds (~0.1 ms) after each region before they sleep,
so the next GEMM or kernel, microseconds away, finds them awake. Longer spinning (libgomp's default,
~3 ms) steals the cores OpenBLAS's own threads need for the float32 matmuls; no spinning, or numba's
separate workqueue pool, leaves every region waking sleeping threads. Measured on gpt2-small, 2
cores, ms per step:

    bfloat16   workqueue 853   shared pool, no spin 838   shared pool + 10k spins 746
    float32    workqueue 1,971                             shared pool + 10k spins 1,955
               shared pool + libgomp's default spins 2,976

Where numba has no OpenMP layer (no libgomp) it keeps the workqueue. NUMBA_THREADING_LAYER,
GOMP_SPINCOUNT and OMP_WAIT_POLICY set in the environment win. How many threads: numba's count
(NUMBA_NUM_THREADS, default every core) for the kernels and, set around each call in bf16.py, the GEMMs.
"""
import os

import numba

SPIN_ROUNDS = "10000"

os.environ.setdefault("GOMP_SPINCOUNT", SPIN_ROUNDS)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleep after the spin (an explicit count still spins)
if "NUMBA_THREADING_LAYER" not in os.environ:
    try:
        from numba.np.ufunc import omppool  # noqa: F401 (imports only where libgomp loads)
        numba.config.THREADING_LAYER = "omp"
    except ImportError:
        numba.config.THREADING_LAYER = "workqueue"

"""CPU inference engine for compressed CNNs: numpy, numba, scipy, h5py, threadpoolctl; never torch.

    model = engine.load("net.h5")
    y = model(x)                      # x: float ndarray (B, C, H, W)
    model.verify().ok                 # every node against the file's stored references
    model.count()                     # MACs, params, bytes per node
"""
import os

import numba

# Numba's default "workqueue" layer refuses concurrent calls from several Python threads; a
# threadsafe layer (TBB if installed, else OpenMP) lets one Model serve many threads. OpenMP is
# not fork-safe: start worker processes with spawn or subprocess.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"
# One thread pool per call, Numba's: the GEMM kernels (ops/gemm.py) call single-threaded BLAS
# from inside their prange tasks (SciPy's BLAS, which Numba calls, is set to 1 thread when they
# load), so no OpenBLAS threads spin against Numba's (that made a conv sequence 3.5x slower).
# OpenMP's threads spin after a parallel loop before they sleep (passive waiting cost 15% at
# batch 1), here for 2M iterations (~55 ms on the 2-vCPU KVM machine, as ONNX Runtime's pool
# spins ~60 ms) instead of libgomp's 300k (~8 ms): a sleeping thread there took 2-8 ms to
# wake, and a batch-1 BasisConv VGG-16 called every 100 or 500 ms took 6.5 / 4.3 ms, now
# 3.3-3.7 ms (back to back: ~2 ms). Unless the user chose (GOMP_SPINCOUNT, OMP_WAIT_POLICY), and
# only if libgomp is not loaded yet. docs/ARCHITECTURE.md, "Threading".
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000000")

from .errors import EngineError, FormatError, InputError, LimitError, UnsupportedOpError  # noqa: E402
from .format import Limits  # noqa: E402
from .model import Model, load  # noqa: E402
from .dataset import run_dataset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "run_dataset", "Limits", "EngineError", "FormatError", "LimitError",
           "UnsupportedOpError", "InputError", "__version__"]

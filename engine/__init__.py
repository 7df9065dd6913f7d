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
# OpenMP keeps its default wait policy (spin ~0.3 ms, then sleep): passive waiting cost 15% at
# batch 1 (VGG-16 BasisConv 1.15 vs 1.32 ms). docs/ARCHITECTURE.md, "Threading".

from .errors import EngineError, FormatError, InputError, LimitError, UnsupportedOpError  # noqa: E402
from .format import Limits  # noqa: E402
from .model import Model, load  # noqa: E402
from .dataset import run_dataset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "run_dataset", "Limits", "EngineError", "FormatError", "LimitError",
           "UnsupportedOpError", "InputError", "__version__"]

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
# OpenMP threads spinning after a parallel loop starve OpenBLAS's threads (a conv took 30x
# longer on 2 cores); passive waiting costs nothing measurable. Only effective when set before
# libgomp loads (i.e. before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import EngineError, FormatError, InputError, LimitError, UnsupportedOpError  # noqa: E402
from .format import Limits  # noqa: E402
from .model import Model, load  # noqa: E402
from .dataset import run_dataset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "run_dataset", "Limits", "EngineError", "FormatError", "LimitError",
           "UnsupportedOpError", "InputError", "__version__"]

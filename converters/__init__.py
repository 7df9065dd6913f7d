"""Converters: PyTorch model -> self-describing model file (docs/FORMAT.md).

The only package that imports torch, and only when a torch-side name is first used: the NumPy-only
converters (converters.basis, converters.tt) must work where torch is not installed.
"""
__version__ = "0.1.0"

from engine.errors import EngineError, FormatError, InputError, UnsupportedOpError

_TORCH_NAMES = ("export", "trace", "LEAF_EXPORTERS", "register_leaf")

__all__ = [*_TORCH_NAMES, "EngineError", "FormatError", "UnsupportedOpError", "InputError"]


def __getattr__(name: str):
    """Lazy re-export of torch_export's public names (imports torch)."""
    if name in _TORCH_NAMES:
        from . import torch_export
        return getattr(torch_export, name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")

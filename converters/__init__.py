"""Converters: PyTorch model -> self-describing model file (docs/FORMAT.md).

The only package that imports torch, and only when a torch-side name is first used: the NumPy-only
converters (converters.basis, converters.tt) must work where torch is not installed.
"""
__version__ = "0.1.0"

from engine.errors import EngineError, FormatError, InputError, UnsupportedOpError

# torch-side public names -> the module holding them (imported on first use)
_TORCH_NAMES = {"export": "torch_export", "trace": "torch_export", "LEAF_EXPORTERS": "torch_export",
                "register_leaf": "torch_export", "to_basis": "basis_layers", "BasisConv2d": "basis_layers",
                "BasisLinear": "basis_layers", "finetune": "finetune", "to_tt": "tt_layers",
                "TTConv2d": "tt_layers", "TTLinear": "tt_layers"}

__all__ = [*_TORCH_NAMES, "EngineError", "FormatError", "UnsupportedOpError", "InputError"]


def __getattr__(name: str):
    """Lazy re-export of the torch-side public names (imports torch)."""
    if name in _TORCH_NAMES:
        import importlib
        return getattr(importlib.import_module(f".{_TORCH_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")

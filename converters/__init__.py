"""Converters: PyTorch model -> self-describing model file (docs/FORMAT.md).

The only package that imports torch; the engine never does.
"""
__version__ = "0.1.0"

from engine.errors import EngineError, FormatError, InputError, UnsupportedOpError

from .torch_export import LEAF_EXPORTERS, export, register_leaf, trace

__all__ = ["export", "trace", "LEAF_EXPORTERS", "register_leaf",
           "EngineError", "FormatError", "UnsupportedOpError", "InputError"]

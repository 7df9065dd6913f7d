"""Load a user's model for `basisconv convert`: a factory from a file or module, and weights."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from engine.errors import FormatError


def load_factory(spec: str, state_dict: str | None = None):
    """'path/to/net.py:build' or 'package.module:build' -> build(), optionally with loaded weights."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise FormatError(f"model spec must look like FILE.py:FACTORY or module:FACTORY, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(2, "no such model file", str(path))
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise FormatError(f"{target} has no callable '{name}'")
    model = factory()
    if state_dict:
        import torch
        # weights_only: never unpickle arbitrary objects from a file someone sent
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model

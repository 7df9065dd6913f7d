"""Graph / Node: the in-memory model that converters produce and the engine runs.

Every node has exactly one output tensor, named like the node. Tensor names are graph input
names or node names. Shapes use None for the free batch dimension.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Node:
    name: str                      # unique; also the name of its output tensor
    op: str                        # op type, e.g. "conv2d" (see docs/FORMAT.md)
    inputs: list[str]              # tensor names, in the op's argument order
    attrs: dict = field(default_factory=dict)                  # JSON-serialisable
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 array
    module: str = ""               # module path in the source model ("" if functional)
    shape: list | None = None      # output shape seen at export, None = free batch dim


@dataclass
class TensorSpec:
    name: str
    shape: list                    # e.g. [None, 3, 32, 32]; None = free batch dimension


@dataclass
class Graph:
    inputs: list[TensorSpec]
    outputs: list[tuple[str, str]]  # (output name, node name) in the model's own order
    output_kind: str                # "tensor" | "tuple" | "dict": what Model(x) returns
    nodes: list[Node]               # topological order
    meta: dict = field(default_factory=dict)  # producer, torch_version, model_class, ...

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self) -> dict[str, list[str]]:
        """Tensor name -> names of the nodes reading it (graph outputs count as a reader "")."""
        users: dict[str, list[str]] = {t.name: [] for t in self.inputs}
        for n in self.nodes:
            users.setdefault(n.name, [])
            for i in n.inputs:
                users.setdefault(i, []).append(n.name)
        for _, node_name in self.outputs:
            users.setdefault(node_name, []).append("")
        return users

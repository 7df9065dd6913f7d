"""The engine's error types: one per failure family, all under EngineError.

Every message names the node (or input) concerned, what was expected and what was found.
"""


class EngineError(Exception):
    """Base of every error the engine and the converters raise on purpose."""


class FormatError(EngineError):
    """A model file (or in-memory graph) is malformed: schema, version, graph, weights, attributes."""


class LimitError(FormatError):
    """A file asks for more resources than the configured limits allow."""


class UnsupportedOpError(EngineError):
    """An op (at export or in a file) that this version does not know."""


class InputError(EngineError, ValueError):
    """A run's input has the wrong type, dtype, rank or shape; or a converter got a bad argument.

    Also a ValueError, so code catching ValueError for bad arguments keeps working."""


class ShapeMismatch(Exception):
    """Internal: an op's shape check failed. Turned into FormatError at load, InputError at run."""

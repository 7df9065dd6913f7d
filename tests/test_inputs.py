"""Bad and unusual inputs: the dtype policy (any float dtype, byte order or layout becomes
C-contiguous float32), named errors for the rest, IEEE NaN/Inf, and batch sizes up to the limits.
(Wrong rank, int dtype, empty batch and lists are in test_format.py.)"""
import numpy as np
import pytest
from test_format import tiny_graph

import engine
from engine import format as fmt
from engine.graph import Graph, Node, TensorSpec

X = np.random.default_rng(3).standard_normal((4, 3, 6, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return engine.Model(tiny_graph(), fmt.References())


@pytest.fixture(scope="module")
def want(model):
    return model(X)


@pytest.mark.parametrize("make", [
    lambda x: x.astype(np.float16),
    lambda x: x.astype(np.longdouble),
    lambda x: x.astype(">f8"),
    lambda x: np.repeat(x, 2, axis=3)[:, :, :, ::2],                  # strided view
    lambda x: np.ascontiguousarray(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1],  # negative strides
    lambda x: np.ascontiguousarray(x.transpose(2, 3, 0, 1)).transpose(2, 3, 0, 1),
    lambda x: np.lib.stride_tricks.as_strided(x, writeable=False),    # read-only
], ids=["float16", "longdouble", "big-endian f8", "strided", "negative strides", "transposed", "read-only"])
def test_float_inputs_of_any_layout(model, want, make):
    x = make(X)
    got = model(x)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    tol = 2e-2 if x.dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got, model(x.astype(np.float32)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_input_is_not_modified(model):
    x = X.copy()
    model(x)
    model.activations(x)
    np.testing.assert_array_equal(x, X)


@pytest.mark.parametrize("x", [
    X.astype(np.complex64), X > 0, X.astype(np.uint8), X.astype(object), X.astype("datetime64[s]"),
    X.astype(str),
], ids=["complex", "bool", "uint8", "object", "datetime", "str"])
def test_non_float_dtypes_are_refused(model, x):
    with pytest.raises(engine.InputError, match="floating dtype"):
        model(x)


@pytest.mark.parametrize("x, words", [
    (np.zeros((2, 3, 0, 6), np.float32), "empty"),
    ((X, X), "takes 1 input"),
    (np.float32(1.0), "ndarray"),
])
def test_shapes_and_counts(model, x, words):
    with pytest.raises(engine.InputError, match=words):
        model(x)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_propagate_per_sample(model, want):
    x = X.copy()
    x[0, 0, 0, 0] = np.nan
    x[1, 2, 3, 3] = np.inf
    got = model(x)
    assert np.isnan(got[0]).any() and not np.isfinite(got[1]).all()
    np.testing.assert_array_equal(got[2:], want[2:])


def test_batch_is_free_and_independent(model, want):
    np.testing.assert_allclose(np.concatenate([model(X[i:i + 1]) for i in range(4)]), want, rtol=1e-5, atol=1e-6)
    big = np.tile(X, (16, 1, 1, 1))
    np.testing.assert_allclose(model(big)[-4:], want, rtol=1e-5, atol=1e-6)


def test_huge_batch_is_refused_before_any_allocation(model):
    """A broadcast view claims 10^9 images without memory; refused before it is converted."""
    x = np.broadcast_to(X[:1], (10 ** 9, 3, 6, 6))
    with pytest.raises(engine.LimitError, match="max_activation_elements"):
        model(x)
    with pytest.raises(engine.LimitError):
        model.activations(x)


def test_activations_hold_more_than_a_call():
    """Model(x) frees as it goes; activations(x) keeps every node: the same batch can pass the
    first and exceed max_live_elements in the second."""
    model = engine.Model(tiny_graph(), fmt.References(), engine.Limits(max_live_elements=4 * 400))
    model(X)
    with pytest.raises(engine.LimitError, match="every node kept"):
        model.activations(X)


def test_multi_input_models():
    g = Graph([TensorSpec("a", [None, 3]), TensorSpec("b", [None, 3])], [("y", "s")], "tensor",
              [Node("s", "add", ["a", "b"])])
    model = engine.Model(g, fmt.References())
    a, b = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float64).reshape(2, 3)
    np.testing.assert_array_equal(model((a, b)), a + b)
    np.testing.assert_array_equal(model([a, b[:1]]), a + b[:1])   # NumPy broadcasting, as torch
    for bad, words in [((a,), "takes 2 input"), ((a, b.astype(np.int64)), "input 'b'"),
                       ((a, np.ones((2, 4), np.float32)), "broadcastable")]:
        with pytest.raises(engine.InputError, match=words):
            model(bad)


def test_count_with_a_shape_the_model_cannot_take(model):
    with pytest.raises(engine.InputError):
        model.count(input_shape=(1, 3, 7, 6))

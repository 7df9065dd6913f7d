"""Whole networks: every architecture family converted, loaded and checked node by node
against PyTorch, at batch 1 and 4 and at spatial sizes that are not powers of two."""
import numpy as np
import pytest
import torch

import converters
import engine
from tests.models import FAMILIES, as_list
from engine.verify import compare

RTOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family name -> (torch model, path of its exported file)."""
    out = {}
    root = tmp_path_factory.mktemp("nets")
    for name, (factory, shape) in FAMILIES.items():
        model = factory().eval()
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        batch4 = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(1))
        path = converters.export(model, example, root / f"{name}.h5", reference_inputs=[batch4], n_random=1)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_node_matches_pytorch(exported, name):
    _, path = exported[name]
    report = engine.load(path).verify(rtol=RTOL)
    assert report.ok, report.summary()
    assert {r.run for r in report.rows} == {0, 1, 2}     # batch 1 example, batch 4, one random


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_outputs_match_pytorch_at_other_batch(exported, name):
    torch_model, path = exported[name]
    model = engine.load(path)
    shape = FAMILIES[name][1]
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = torch_model(x)
    got = model(x.numpy())
    want, got = as_list(want), as_list(got)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        _, rel = compare(g, w.numpy())
        assert rel <= RTOL, rel


def test_fully_convolutional_nets_run_at_other_spatial_sizes(exported):
    torch_model, path = exported["resnet18"]
    x = torch.randn(2, 3, 45, 29, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = torch_model(x).numpy()
    _, rel = compare(engine.load(path)(x.numpy()), want)
    assert rel <= RTOL


def test_reference_kernels_match_pytorch_too(exported):
    _, path = exported["vgg16_bn"]
    model = engine.load(path)
    run = model.references.runs[0]
    acts = model.activations(run.inputs["x"], kernels="reference")
    worst = max(compare(acts[k], v)[1] for k, v in run.nodes.items())
    assert worst <= RTOL


def test_multi_output_kinds(exported):
    for name, kind in (("two_outputs", tuple), ("dict_outputs", dict)):
        torch_model, path = exported[name]
        x = torch.randn(*FAMILIES[name][1], generator=torch.Generator().manual_seed(5))
        got = engine.load(path)(x.numpy())
        assert isinstance(got, kind)
        with torch.no_grad():
            want = torch_model(x)
        if kind is dict:
            assert list(got) == list(want)

"""First drop-in checks: a simplified module accepts other batch and spatial sizes than the example
(the graph does not bake in the example's shape) and survives ``copy.deepcopy``."""
from __future__ import annotations

import copy

import pytest
import torch

import topofx
from topofx import zoo
from topofx.capture import max_rel_error, preserved_state

SHAPES = [(1, 3, 32, 32), (7, 3, 32, 32), (2, 3, 16, 16)]


@pytest.mark.parametrize("name,overrides", [("nb201-darts", {"C": 8, "N": 1}), ("pcdarts", {})])
def test_other_shapes_exact(name, overrides):
    model, (x,) = zoo.build(name, batch_size=4, **overrides)
    simplified = topofx.simplify(model, x, mode="exact")
    for shape in SHAPES:
        y = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with preserved_state(model):
            expected = model(y)
        with preserved_state(model):
            got = simplified(y)
        assert max_rel_error(got, expected) <= 1e-5, shape


def test_deepcopy_keeps_a_working_independent_module():
    model, (x,) = zoo.build("nb201-darts", C=8, N=1, batch_size=4)
    simplified = topofx.simplify(model, x, mode="exact")
    clone = copy.deepcopy(simplified)
    assert clone.original is not model
    with preserved_state(clone.original):
        got = clone(x)
    with preserved_state(model):
        expected = model(x)
    assert max_rel_error(got, expected) <= 1e-5
    with torch.no_grad():  # the clone's parameters are its own, and its graph reads them
        clone.original.arch_parameters.normal_()
    assert not torch.equal(clone.original.arch_parameters, model.arch_parameters)
    with preserved_state(clone.original):
        changed = clone(x)
    with preserved_state(clone.original):
        assert max_rel_error(changed, clone.original(x)) <= 1e-5
    assert max_rel_error(changed, expected) > 1e-3
    assert {id(p) for p in clone.parameters()} == {id(p) for p in clone.original.parameters()}

"""Non-tensor forward arguments choose the path (point 6 of issue 12): never baked silently.

A search codebase whose weight step runs another path than its architecture step calls
``model(x, 'weight')`` / ``model(x, updateType='weight')``.  The simplified module must accept the
original's signature and run the path each call asks for.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx import CaptureError


class PathArgNet(nn.Module):
    """Weight step: straight-through one-hot weights; architecture step: softmax weights."""

    def __init__(self, C: int = 3):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(3) * 0.5)
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C, affine=False)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)),
            nn.AvgPool2d(3, 1, 1),
        ])
        self.head = nn.Linear(C, 4)

    def forward(self, x, updateType="alpha", scale=None):
        probs = F.softmax(self.alpha, dim=-1)
        if updateType == "weight":
            hard = torch.zeros_like(probs).scatter_(0, probs.argmax().view(1), 1.0)
            weights = hard - probs.detach() + probs
        else:
            weights = probs
        y = sum(w * op(x) for w, op in zip(weights, self.ops))
        if scale is not None:
            y = y * scale
        return self.head(y.mean((2, 3)))


def _pair(example=None):
    torch.manual_seed(0)
    model = PathArgNet()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture must not fall back
        simplified = topofx.simplify(PathArgNet_copy(model), example or (x,), mode="exact")
    return model, simplified, x


def PathArgNet_copy(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.parametrize("call", [
    lambda m, x: m(x),
    lambda m, x: m(x, "weight"),
    lambda m, x: m(x, updateType="weight"),
    lambda m, x: m(x, "alpha", 2.0),
    lambda m, x: m(x, scale=3.0, updateType="weight"),
])
def test_each_choice_runs_its_own_path(call):
    model, simplified, x = _pair()
    assert simplified.report.fallback is None
    expected = call(model, x)
    got = call(simplified, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call(simplified, x), call(model, x), rtol=1e-5, atol=1e-6)  # cached graph again


def test_paths_differ_so_the_check_can_fail():
    model, _, x = _pair()
    assert (model(x, "weight") - model(x)).abs().max() > 1e-3


def test_captured_with_a_non_default_choice():
    torch.manual_seed(0)
    model = PathArgNet()
    x = torch.randn(2, 3, 8, 8)
    import copy
    simplified = topofx.simplify(copy.deepcopy(model), (x, "weight"), mode="exact")
    assert simplified.report.fallback is None
    torch.testing.assert_close(simplified(x), model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(simplified(x, "weight"), model(x, "weight"), rtol=1e-5, atol=1e-6)


def test_graph_module_asserts_its_choice():
    """The graph itself refuses another value (defence in depth behind the module's dispatch)."""
    model, simplified, x = _pair()
    with pytest.raises(Exception, match="specialized"):
        simplified.graph_module(x, "weight")


def test_training_steps_follow_the_original_on_both_paths():
    model, simplified, x = _pair()
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(simplified.parameters(), lr=0.1)
    for step, kind in enumerate(["weight", "alpha", "weight", "alpha"]):
        for m, opt in ((model, opt_a), (simplified, opt_b)):
            opt.zero_grad()
            m(x, updateType=kind).square().mean().backward()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), simplified.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
        for (name, b), c in zip(model.named_buffers(), simplified.original.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


class OptionsNet(PathArgNet):
    def forward(self, x, options=None):
        return super().forward(x, **(options or {}))


def test_unhashable_argument_runs_eagerly_with_a_warning():
    torch.manual_seed(0)
    model, x = OptionsNet(), torch.randn(2, 3, 8, 8)
    import copy
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode="exact")
    assert simplified.report.fallback is None
    with pytest.warns(UserWarning, match="cannot be told apart by hash"):
        got = simplified(x, {"updateType": "weight"})
    torch.testing.assert_close(got, model(x, {"updateType": "weight"}), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):  # a call forward() rejects raises the original's own error
        simplified(x, bogus=1)


class WeightsDictNet(PathArgNet):
    """Shapley-NAS style: forward(x, weights_dict=None) -- the mixing weights from the alphas, or a dict of
    weight tensors the caller masked in place (one op's weight zeroed per call)."""

    def forward(self, x, weights_dict=None):
        if weights_dict is None:
            return super().forward(x)
        out = x
        for w in weights_dict["edges"]:
            out = sum(wk * op(out) for wk, op in zip(w, self.ops))
        return out


def test_tensors_inside_a_dict_argument_are_refused_naming_it():
    """A dict of tensors as an example argument was specialized as a constant: FX's code generation raised a
    SyntaxError, and simplify fell back saying so.  Now refused naming the argument and the fix; calls with
    such a dict after a capture without one run eagerly and stay equal to the original."""
    torch.manual_seed(0)
    model, x = WeightsDictNet(), torch.randn(2, 3, 8, 8)
    weights = {"edges": torch.softmax(torch.randn(2, len(model.ops)), -1)}
    with pytest.raises(CaptureError, match="argument `weights_dict` holds tensors in a dict"):
        topofx.simplify(model, (x, weights), mode="exact", strict=True)
    with pytest.warns(UserWarning, match="argument `weights_dict` holds tensors in a dict"):
        assert topofx.simplify(model, (x, weights), mode="exact").report.fallback
    simplified = topofx.simplify(model, (x,), mode="exact")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(len(model.ops)):
            weights["edges"][0, k] = 0.0  # in place, as the estimation loop does
            torch.testing.assert_close(simplified(x, weights), model(x, weights))

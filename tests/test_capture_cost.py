"""What one trace costs must not grow with the size of the model in ways the model does not ask for.

Two costs seen on NNI 3.0's one-shot supernets (every conv and BN a module whose forward is traced
through; thousands of small helper objects made in forward), each quadratic before:

* FX's ``Tracer.getattr`` searched the root's whole module tree (``named_parameters()``,
  ``named_buffers()``) on every read of a parameter or buffer in a forward traced through: the tracer
  now looks the name up in an index built once per trace (:meth:`ValueTracer._registered_name`);
* ``topofx.capture.reads`` looked up every name of every recorded function on every plain object it
  met (``inspect.getattr_static``): it now looks up only the names the object or its class defines.

Both are counted here, not timed: the count must be the same for a small and a large model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx.capture import reads, trace


class _Scaled(nn.Module):
    """A module whose forward is traced through (not a ``torch.nn`` leaf) and reads its own tensors."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.register_buffer("shift", torch.randn(1, c, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1) + self.shift


class _Chain(nn.Module):
    def __init__(self, n: int, c: int = 3):
        super().__init__()
        self.ops = nn.ModuleList([_Scaled(c) for _ in range(n)])
        self.ops[-1].weight = self.ops[0].weight  # tied: the first name is the one the graph reads
        self.alpha = nn.Parameter(torch.randn(n))

    def forward(self, x):
        w = self.alpha.softmax(-1)
        return sum(w[i] * op(x) for i, op in enumerate(self.ops))


def _root_walks(model: nn.Module, monkeypatch) -> int:
    walks = [0]
    real = nn.Module._named_members

    def counted(self, *args, **kwargs):
        walks[0] += self is model
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "_named_members", counted)
    gm = trace(model, (torch.randn(2, 3, 8, 8),))
    monkeypatch.setattr(nn.Module, "_named_members", real)
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "ops.0.weight" in targets and f"ops.{len(model.ops) - 1}.weight" not in targets
    assert {f"ops.{i}.shift" for i in range(len(model.ops))} <= targets
    return walks[0]


def test_reading_parameters_in_forwards_traced_through_walks_the_tree_a_fixed_number_of_times(monkeypatch):
    torch.manual_seed(0)
    assert _root_walks(_Chain(2), monkeypatch) == _root_walks(_Chain(12), monkeypatch)


def test_a_chain_read_by_index_is_exact():
    torch.manual_seed(0)
    model, x = _Chain(4), torch.randn(2, 3, 8, 8)
    expected = model(x)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    torch.testing.assert_close(simplified(x), expected, rtol=0, atol=0)


class _Slice:
    """A small helper object made in forward, as weight-slicing utilities make them."""

    def __init__(self, stop: int):
        self.stop = stop


class _Sliced:
    def __init__(self, stop: int):
        self.slice = _Slice(stop)


def _take(weight: torch.Tensor, s: _Sliced) -> torch.Tensor:
    bounds = s.slice  # a path that ends at a plain object: every number below it is a read
    return weight[: bounds.stop]


def _named(count: int):
    """A forward whose code spells ``count`` extra names (string constants): what the reads recorder
    knows as names grows with it, the helper objects do not."""
    source = "def forward(self, x):\n    _ = (" + "".join(f"'n{i}', " for i in range(count)) + ")\n" \
             "    return x * _take(self.w, _Sliced(3)).sum()\n"
    scope: dict = {"_take": _take, "_Sliced": _Sliced}
    exec(compile(source, __file__, "exec"), scope)
    return type(f"_Named{count}", (nn.Module,), {
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "w", nn.Parameter(torch.randn(4))))[0],
        "forward": scope["forward"],
    })()


def test_plain_objects_cost_lookups_of_their_own_names_only(monkeypatch):
    """The recorded code spells 200 names; a helper object defines one (and its class's dunders): no
    other is looked up on it, and its field is still found (a read the guards compare)."""
    looked_up: list[str] = []
    real = reads._attr

    def counted(obj, name):
        if isinstance(obj, _Slice):
            looked_up.append(name)
        return real(obj, name)

    monkeypatch.setattr(reads, "_attr", counted)
    trace(_named(200), (torch.randn(2),))
    assert "stop" in looked_up
    assert not [n for n in looked_up if not hasattr(_Slice(0), n)], sorted(set(looked_up))

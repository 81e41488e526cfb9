"""The simplified graph's code calls its modules through ``_modules`` (topofx.codegen): no
``nn.Module.__getattr__`` per level, the same modules, hooks and results."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import topofx


class Edge(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 5, padding=2, bias=False), nn.BatchNorm2d(c)),
            nn.Identity(),
        ])

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class Net(nn.Module):
    def __init__(self, c: int = 4, edges: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.edges = nn.ModuleList(Edge(c) for _ in range(edges))
        self.alpha = nn.Parameter(1e-3 * torch.randn(edges, 3))

    def forward(self, x):
        x = self.stem(x)
        w = F.softmax(self.alpha, dim=-1)
        for i, edge in enumerate(self.edges):
            x = edge(x, w[i])
        return x.mean((2, 3))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_module_calls_read_the_module_dictionaries_and_compute_the_same():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    simplified = topofx.simplify(model, (x,), mode="exact")
    code = simplified.graph_module.code
    assert "getattr(" not in code and "._modules['edges']._modules['0']" in code
    out, grads = _step(simplified, x)
    ref_out, ref_grads = _step(reference, x)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_a_module_replaced_after_simplify_is_the_one_called_and_copies_keep_the_calls():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    gm = topofx.simplify(model, (x,), mode="exact").graph_module
    calls = []
    target = next(n.target for n in gm.graph.nodes if n.op == "call_module" and "." in n.target)
    replacement = copy.deepcopy(gm.get_submodule(target))
    replacement.register_forward_hook(lambda *_: calls.append(1))
    gm.set_submodule(target, replacement)  # the call reads the live module tree
    gm(x)
    assert calls == [1]
    copied = copy.deepcopy(gm)  # (the copy's graph keeps the code transformer)
    assert "getattr(" not in copied.code and "._modules[" in copied.code
    torch.testing.assert_close(copied(x), gm(x))


def test_a_target_whose_chain_does_not_reach_its_module_keeps_fx_code():
    from topofx.codegen import direct_module_calls

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert direct_module_calls(gm) == 2 and "getattr(" not in gm.code
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    setattr(type(gm), "0", nn.Linear(2, 2))  # a class attribute "0": getattr finds it, not the submodule
    assert direct_module_calls(gm) == 0
    assert 'getattr(self, "0")' in gm.code

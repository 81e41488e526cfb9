"""Adapters: capture supernets whose forward samples the architecture in a way no tracer can follow.

GDAS draws a hard one-hot ``hardwts`` (straight-through Gumbel) and an ``index`` per edge, loops
until the sample is finite, and branches on ``index[e].item()`` to run only the selected op.  An
:class:`Adapter` splits such a forward into

* ``sample(model) -> dict[str, Tensor]`` -- the sampling, run eagerly as an opaque step before each
  call (it draws from the RNG exactly as the original forward does), and
* ``relaxed(model, *inputs, **samples)`` -- a traceable forward that computes every edge as the
  weighted sum over all candidates with the sampled weights.

At a one-hot sample the weighted sum equals the original's value (the unselected terms are
``0 * op(x)``), so a captured relaxed forward is vertex-exact; topo mode then merges each edge's
convolutions into about one convolution per edge.  The original runs only the selected candidates,
so :class:`UnselectedFreeze` keeps the others' parameters out of autograd and their BN statistics
still for each call.  Adapters are looked up by model class (the
nearest registered base class wins); :func:`register_adapter` adds one for a user's model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .topology import Topology


@dataclasses.dataclass(frozen=True)
class Adapter:
    sample: Callable[[nn.Module], dict[str, torch.Tensor]]
    relaxed: Callable[..., Any]
    description: str = ""


_REGISTRY: dict[type, Adapter] = {}
_BUILTINS_LOADED = False


def register_adapter(cls: type, sample: Callable[[nn.Module], dict[str, torch.Tensor]], relaxed: Callable[..., Any],
                     description: str = "") -> None:
    """Register how to capture models of class ``cls`` (and its subclasses)."""
    _REGISTRY[cls] = Adapter(sample, relaxed, description)


def adapter_for(model: nn.Module) -> Adapter | None:
    """The adapter registered for ``model``'s class or its nearest registered base class."""
    _load_builtins()
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def hard_gumbel_sample(alpha: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GDAS's straight-through hard Gumbel-softmax per row: ``(hardwts, index)``, redrawn until finite.

    Draws ``exponential_`` noise of ``alpha``'s shape, as GDAS does, so the same RNG state gives the
    same sample.  ``hardwts`` is one-hot in value and carries the gradient of the soft sample.
    """
    while True:
        gumbels = -torch.empty_like(alpha).exponential_().log()
        probs = F.softmax((alpha.log_softmax(dim=1) + gumbels) / tau, dim=1)
        index = probs.max(-1, keepdim=True)[1]
        hardwts = torch.zeros_like(probs).scatter_(-1, index, 1.0) - probs.detach() + probs
        if not (torch.isinf(gumbels).any() or torch.isinf(probs).any() or torch.isnan(probs).any()):
            return hardwts, index


def _nb201_gdas_sample(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"hardwts": hard_gumbel_sample(model.arch_parameters, model.tau)[0]}


def _nb201_gdas_relaxed(model: nn.Module, inputs: torch.Tensor, hardwts: torch.Tensor):
    from xautodl.models.cell_searchs.search_cells import NAS201SearchCell

    feature = model.stem(inputs)
    for cell in model.cells:
        feature = cell(feature, hardwts) if isinstance(cell, NAS201SearchCell) else cell(feature)
    out = model.global_pooling(model.lastact(feature))
    out = out.view(out.size(0), -1)
    return out, model.classifier(out)


def _nasnet_gdas_sample(model: nn.Module) -> dict[str, torch.Tensor]:
    normal = hard_gumbel_sample(model.arch_normal_parameters, model.tau)[0]
    reduce = hard_gumbel_sample(model.arch_reduce_parameters, model.tau)[0]
    return {"normal_hardwts": normal, "reduce_hardwts": reduce}


def _nasnet_gdas_relaxed(model: nn.Module, inputs: torch.Tensor, normal_hardwts: torch.Tensor,
                         reduce_hardwts: torch.Tensor):
    s0 = s1 = model.stem(inputs)
    for cell in model.cells:
        s0, s1 = s1, cell.forward_darts(s0, s1, reduce_hardwts if cell.reduction else normal_hardwts)
    out = model.global_pooling(model.lastact(s1))
    out = out.view(out.size(0), -1)
    return out, model.classifier(out)


def _load_builtins() -> None:
    """Adapters for xautodl's GDAS supernets, registered when xautodl is installed."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    try:
        from xautodl.models.cell_searchs import NASNetworkGDAS, TinyNetworkGDAS
    except ImportError:
        return
    register_adapter(TinyNetworkGDAS, _nb201_gdas_sample, _nb201_gdas_relaxed, "xautodl NAS-Bench-201 GDAS")
    register_adapter(NASNetworkGDAS, _nasnet_gdas_sample, _nasnet_gdas_relaxed, "xautodl DARTS-space GDAS")


class RelaxedForward(nn.Module):
    """``model`` with its sampling lifted out: the sampled tensors are attributes that the traced
    graph reads, set by :meth:`resample` before each call."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        super().__init__()
        self.model = model
        self.__dict__["adapter"] = adapter
        with torch.random.fork_rng(devices=[]):  # the first sample only names the tensors
            first = adapter.sample(model)
        self.__dict__["sample_names"] = tuple(first)
        for name, value in first.items():
            setattr(self, name, value.detach().requires_grad_(value.requires_grad))  # a leaf: live, copyable

    def resample(self, target: nn.Module) -> None:
        """Draw a new sample from the original's parameters and store it on ``target``."""
        for name, value in self.adapter.sample(self.model).items():
            setattr(target, name, value)

    def release(self, target: nn.Module) -> None:
        """Detach the samples stored on ``target`` after a call (autograd keeps what backward needs), so
        the module holds no autograd history between calls and ``copy.deepcopy`` works."""
        for name in self.sample_names:
            value = getattr(target, name)
            setattr(target, name, value.detach().requires_grad_(value.requires_grad))

    def forward(self, inputs: Any) -> Any:  # one input, as the NAS supernets take (FX needs a fixed signature)
        return self.adapter.relaxed(self.model, inputs, **{n: getattr(self, n) for n in self.sample_names})


_Tensor = tuple[nn.Module, str, str]  # (owner module, "_parameters" | "_buffers", attribute name)


class UnselectedFreeze:
    """Freeze, for one call, the parameters and buffers that only unselected candidates use.

    GDAS runs only the selected candidate of each edge, so the others' parameters get no gradient
    (``.grad`` stays ``None``: weight decay and momentum leave them alone) and their BN running
    statistics do not move.  The relaxed graph computes every candidate, times an exact 0; this
    gate restores GDAS's behaviour.  Built from the captured graph *before* any rewrite:

    * a candidate is gated when its weight reads a sample by indexing alone
      (``hardwts[e][k]``); its flat position in the sample is fixed at capture;
    * a parameter or buffer belongs to the candidates whose branches call its module (or read it
      through ``get_attr``); one that any other node uses (a stem, a shared op, a candidate with another kind of weight)
      is never frozen.

    Before each call, the candidates whose sampled weight is exactly 0 are the unselected ones; a
    tensor all of whose candidates are unselected is swapped, for the call, for a detached view
    (parameters; same values, so the output is unchanged and no gradient reaches it) or a
    throw-away copy (buffers, train mode: the statistics update lands there).  Rewritten modules
    (fused and merged convolutions) read their originals' tensors at call time, so they see the
    swap too.  Costs one device sync per call (GDAS itself syncs once per edge).
    """

    def __init__(self, gm: fx.GraphModule, topology: Topology, sample_names: tuple[str, ...]):
        candidates = [c for edge in topology.edges for c in edge.candidates]
        positions = [_sample_position(gm, c.weight, sample_names) for c in candidates]
        owners: dict[fx.Node, set[int]] = defaultdict(set)
        for i, cand in enumerate(candidates):
            for node in cand.branch:
                owners[node].add(i if positions[i] is not None else -1)  # -1: always runs
        for node in gm.graph.nodes:  # a tensor read by get_attr belongs where its readers do
            if node.op == "get_attr":
                owners[node] = set().union(*(owners.get(user, {-1}) for user in node.users))
        users: dict[tuple[int, str, str], set[int]] = defaultdict(set)
        tensor_of: dict[tuple[int, str, str], _Tensor] = {}
        for node in gm.graph.nodes:
            for tensor in _tensors_read(gm, node):
                key = (id(tensor[0]), tensor[1], tensor[2])
                tensor_of[key] = tensor
                users[key] |= owners.get(node) or {-1}
        groups: dict[frozenset[int], list[_Tensor]] = defaultdict(list)
        for key, cands in users.items():
            if -1 not in cands:
                groups[frozenset(cands)].append(tensor_of[key])
        by_sample: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i in sorted({i for cands in groups for i in cands}):
            name, flat = positions[i]
            by_sample[name].append((i, flat))
        self.samples = [(name, torch.tensor([flat for _, flat in items])) for name, items in by_sample.items()]
        self.index = {i: k for k, i in enumerate(i for items in by_sample.values() for i, _ in items)}
        self.groups = list(groups.items())

    @contextlib.contextmanager
    def __call__(self, gm: fx.GraphModule) -> Iterator[None]:
        """Freeze what only unselected candidates use, for the duration of one call of ``gm``."""
        if not self.groups:
            yield
            return
        weights = [getattr(gm, name).detach().reshape(-1) for name, _ in self.samples]
        zero = torch.cat([w[flat.to(w.device)] for w, (_, flat) in zip(weights, self.samples)]) == 0
        unselected = zero.tolist()  # the call's one device sync
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        for cands, tensors in self.groups:
            if not all(unselected[self.index[i]] for i in cands):
                continue
            for owner, kind, name in tensors:
                table = getattr(owner, kind)
                value = table[name]
                if kind == "_parameters":
                    table[name] = value.detach()
                elif gm.training:
                    table[name] = value.clone()
                else:
                    continue
                swapped.append((table, name, value))
        try:
            yield
        finally:
            for table, name, value in swapped:
                table[name] = value


def _sample_position(gm: fx.GraphModule, weight: fx.Node, sample_names: tuple[str, ...]) -> tuple[str, int] | None:
    """``(sample name, flat index)`` when ``weight`` indexes a sample (``hardwts[e][k]``), else ``None``."""
    indices = []
    node = weight
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        dynamic: list[fx.Node] = []
        fx.node.map_arg(node.args[1], dynamic.append)
        if dynamic:  # an index computed in the graph
            return None
        indices.append(node.args[1])
        node = node.args[0]
    if node.op != "get_attr" or node.target not in sample_names:
        return None
    sample = getattr(gm, node.target)
    flat = torch.arange(sample.numel()).reshape(sample.shape)
    for index in reversed(indices):
        flat = flat[index]
    return (node.target, int(flat)) if flat.numel() == 1 else None


def _tensors_read(gm: fx.GraphModule, node: fx.Node) -> list[_Tensor]:
    """The parameters and buffers a node reads: all of a called module's, or one ``get_attr``'s."""
    if node.op == "call_module":
        return [(m, kind, name) for m in gm.get_submodule(node.target).modules()
                for kind in ("_parameters", "_buffers") for name, t in getattr(m, kind).items() if t is not None]
    if node.op == "get_attr":
        path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(path)
        return [(owner, kind, name) for kind in ("_parameters", "_buffers") if getattr(owner, kind).get(name) is not None]
    return []

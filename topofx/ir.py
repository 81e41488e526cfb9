"""The graph vocabulary every phase shares: what a captured graph's nodes carry, what its calls do to
memory and to random state, how it runs on meta tensors, and how two runs are compared.

Capture (:mod:`topofx.capture`) writes it, topology (:mod:`topofx.topology`) and the rewrite driver
and passes (:mod:`topofx.rewrite`, :mod:`topofx.passes`) read it, the self-check and the tests compare
with it.  It imports nothing else of topofx, so every phase may import it.

* **Node meta schema**: the keys below (``node.meta[VALUE]`` is a node's meta-tensor value,
  ``gm.meta[VALUE_GUARD]`` the decisions a graph took on architecture values, ...).
* **Meta execution**: :func:`run_on_meta` runs one node on meta tensors (shapes without data or state
  changes); :func:`meta_copy` is a module whose parameters and buffers are meta tensors.
* **Effects and aliasing**: which calls draw random numbers (:func:`draws`, :func:`is_random`), write
  in place (:func:`mutates`, :func:`is_inplace`), may share storage (:func:`aliases`) or are pure
  (:func:`is_pure`), and :class:`Effects`, the program order a rewrite must keep.
* **Module signature**: :func:`module_config`, the one test of whether two modules compute the same
  function (every pass that shares, fuses or merges modules compares with it).
* **Comparison**: :func:`preserved_state`, :func:`run_seeded`, :func:`max_rel_error`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
import random
import sys
import warnings
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn


# ---------------------------------------------------------------------------------------------
# node meta schema
# ---------------------------------------------------------------------------------------------
VALUE = "topofx_value"  # node.meta key: meta-tensor (or python) value of the node
STATIC = "topofx_static"  # node.meta key: value depends on shapes/constants only
FROM_INPUT = "topofx_from_input"  # node.meta key: value is computed from a forward input
REAL = "topofx_real"  # node.meta key (during tracing): the real value of a small tensor computed from attributes only
DRAWN = "topofx_drawn"  # node.meta key: value depends on a random draw made in forward, or on a tensor input
FLOATS = "topofx_floats"  # node.meta key (during tracing): the FloatInputs whose stand-ins the value depends on
AS_FLOAT = "topofx_as_float"  # node.meta key (during tracing): that value as eager computes it from the floats
TRACED_MODULES = "topofx_traced_modules"  # GraphModule.meta key: modules whose forward was traced through
SHAPE_DECISIONS = "topofx_shape_decisions"  # GraphModule.meta key: (user frame, value) of decisions on shapes
DECIDED_PER_CALL = "topofx_decided_per_call"  # GraphModule.meta key: paths of modules called as one node
HELD = "topofx_held"  # GraphModule.meta key: (get_attr target, module, path) of tensors read out of containers
READS = "topofx_reads"  # GraphModule.meta key: the Reads of Python values outside the traced modules' attributes
ATTRIBUTES_READ = "topofx_attributes_read"  # GraphModule.meta key: names traced code can read attributes under (None: any)
VALUE_GUARD = "topofx_value_guard"  # GraphModule.meta key: the ValueGuard of decisions on architecture values
FLOAT_INPUTS = "topofx_float_inputs"  # GraphModule.meta key: the FloatInputs the graph reads as 0-dim tensors
SPECULATION = "topofx_speculation"  # GraphModule.meta key: the Decision of each speculation check, by index
DECIDED_VALUE = "topofx_decided_value"  # node.meta key: the value of a node with no meta run, its shape a guarded decision
UNKNOWN = object()  # value that could not be computed


GATE_DECISIONS = "topofx_gate_decisions"  # GraphModule.meta key: the Decision of each decided gate's window
SPARSE_FORWARD_MARK = "\n# topofx: run sparsely\n"  # what a sparse graph's code appends its forward after (topofx.sparse)


def decided_gate(weight: Any, term: Any, decision: Any, dead: str = "nothing") -> Any:
    """Graph node for a candidate the user's code computes only where a Python decision on its own sampled
    weight holds (``if abs(w) > 1e-10: out += w * op(x)``): ``weight * term`` where ``decision`` (a
    0-dim bool tensor) holds, and where it does not no term (``dead="nothing"``: the user's code adds
    nothing) or the bare weight (``dead="weight"``: ``w[i] * op(x) if i == argmax else w[i]``).  Capture makes it
    (:mod:`topofx.capture.gating`); ``topofx.sparse`` runs the graph so that ``term`` and what only it
    needs are not computed where the decision fails, and the sums leave the term out.  Run as a plain
    function (densely, on meta) it is the product, or zeros where the decision fails: the value, but
    the unselected candidate has run."""
    product = weight * term
    if decision.is_meta or bool(decision):
        return product
    return weight if dead == "weight" else torch.zeros_like(product)


def is_decided_gate(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is decided_gate


# ---------------------------------------------------------------------------------------------
# meta execution
# ---------------------------------------------------------------------------------------------
def flat(a: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(a, out.append)
    return out


def to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("meta")
    return x


def meta_values(a: Any) -> Any:
    """Replace proxies by their recorded values and real tensors by meta copies."""

    def one(x: Any) -> Any:
        if isinstance(x, fx.Proxy):
            return x.node.meta.get(VALUE, UNKNOWN)
        if isinstance(x, fx.Node):
            return x.meta.get(VALUE, UNKNOWN)
        return to_meta(x)

    return fx.node.map_aggregate(a, one)


def contains_unknown(a: Any) -> bool:
    found = []
    fx.node.map_aggregate(a, lambda x: found.append(x is UNKNOWN))
    return any(found)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (tied ones stay tied).

    Running it gives output shapes without touching the real module's state (BN counters) and
    without copying any data.
    """
    clone = copy.deepcopy(module, meta_memo(module))
    for m in clone.modules():  # a cumulative average reads its batch count as a Python number,
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.momentum is None:
            m.momentum = 0.0  # which a meta tensor cannot give; the factor never changes shapes
    return clone


def meta_memo(*modules: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that copies the modules' parameters and buffers as meta tensors."""
    memo: dict[int, Any] = {}
    for module in modules:
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = b.detach().to("meta")
    return memo


@contextlib.contextmanager
def first_path_on_meta() -> Iterator[None]:
    """Python decisions on meta tensors take some path, so a module or method whose forward decides
    per call (called as one node, see ``trace``) still gets its output's shape: every path of a mixed
    op yields the same shape.  A ``bool`` is True the first time each source line asks and False
    after (a redraw-until-finite loop ends; a filtered sum keeps one term); ``.item()`` is 0
    (integers) or 1.0; ``.tolist()`` gives ones."""
    tensor = torch.Tensor
    plain = {name: getattr(tensor, name) for name in ("__bool__", "item", "tolist")}
    asked: set[tuple[Any, int]] = set()

    def first_time(t: torch.Tensor) -> bool:
        caller = sys._getframe(2)
        where = (caller.f_code, caller.f_lineno)
        fresh = where not in asked
        asked.add(where)
        return fresh

    def on_meta(name: str, meta_value: Callable[[torch.Tensor], Any]) -> Callable[..., Any]:
        return lambda t, *a, **k: meta_value(t) if t.is_meta else plain[name](t, *a, **k)

    tensor.__bool__ = on_meta("__bool__", first_time)  # type: ignore[method-assign]
    tensor.item = on_meta("item", lambda t: 1.0 if t.is_floating_point() else 0)  # type: ignore[method-assign]
    tensor.tolist = on_meta("tolist", lambda t: torch.ones(t.shape).tolist())  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in plain.items():
            setattr(tensor, name, fn)


_STOCK_RESULTS: dict[tuple, Any] = {}  # meta output of a stock torch.nn module, by configuration and input metadata


def _signature_of(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.stride(), x.requires_grad)
    return ("value", repr(x))


def _run_module_on_meta(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Run ``module`` on meta inputs.  A stock ``torch.nn`` module without hooks is a function of its
    configuration (``extra_repr``), mode, parameter/buffer shapes and its inputs' metadata, so its
    meta output is computed once per such key (a supernet has thousands of identical BNs and convs)."""
    if hasattr(module, "on_meta"):  # knows what to copy itself (capture's per-call methods, custom Functions)
        return module.on_meta(*args, **kwargs)
    if not is_stock(module):  # a user's forward may draw with no device (torch.rand(())): real draws, on a forked RNG
        with first_path_on_meta(), torch.random.fork_rng(devices=[]):
            return meta_copy(module)(*args, **kwargs)
    key = (
        type(module), module.extra_repr(), module.training,
        tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in [*module.named_parameters(), *module.named_buffers()]),
        tuple(_signature_of(a) for a in args),
        tuple((k, _signature_of(v)) for k, v in sorted(kwargs.items())),
    )
    if key not in _STOCK_RESULTS:
        out = meta_copy(module)(*args, **kwargs)
        aliased = []
        fx.node.map_aggregate((args, kwargs), lambda a: aliased.append(a is out))
        if any(aliased):  # in place or identity: the output is this call's input
            return out
        _STOCK_RESULTS[key] = out
    return _STOCK_RESULTS[key]


def run_on_meta(root: nn.Module, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
    """Execute one node on meta tensors; modules run as :func:`meta_copy` copies (no real state changes)."""
    args, kwargs = meta_values(args), meta_values(kwargs)
    if contains_unknown((args, kwargs)):
        return UNKNOWN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "call_function":
            return on_meta_device(target, args, kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return _run_module_on_meta(root.get_submodule(target), args, kwargs)
        if kind == "get_attr":
            obj: Any = root
            for part in target.split("."):
                obj = getattr(obj, part)
            return to_meta(obj)
    return UNKNOWN


LEGACY_TYPE = type(torch.FloatTensor)  # read at import: tracing replaces torch.FloatTensor by a recorder


_FACTORIES = {getattr(torch, n) for n in ("rand", "randn", "randint", "randperm", "empty", "zeros", "ones", "full",
                                          "arange", "linspace", "logspace", "eye", "normal")}


def on_meta_device(target: Any, args: Any, kwargs: Any) -> Any:
    """Call a function on meta tensors; a factory given only Python numbers (``torch.rand(n, 1)``,
    ``torch.FloatTensor(n, c, h, w)``) makes a meta tensor too: no memory, no random draw."""
    if isinstance(target, LEGACY_TYPE):  # legacy constructor: sizes only (otherwise its own error)
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        if not kwargs and all(isinstance(n, int) for n in sizes):
            return torch.empty(tuple(sizes), dtype=target.dtype, device="meta")
    if target in _FACTORIES and "device" not in kwargs and not any(isinstance(a, torch.Tensor) for a in flat(args)):
        return target(*args, **kwargs, device="meta")
    return target(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# effects and aliasing
# ---------------------------------------------------------------------------------------------
def value_of(node: Any) -> Any:
    return node.meta.get(VALUE) if isinstance(node, fx.Node) else node


def shape_of(node: Any) -> torch.Size | None:
    value = value_of(node)
    return value.shape if isinstance(value, torch.Tensor) else None


# Operations that draw from a random number generator (or return uninitialized memory), by their
# name without leading/trailing underscores: ``bernoulli_``, ``torch._standard_gamma``, ``F.dropout``...
RANDOM_NAMES = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal", "bernoulli",
    "multinomial", "poisson", "binomial", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "feature_dropout", "native_dropout", "fused_dropout", "gumbel_softmax", "rrelu",
    "exponential", "uniform", "geometric", "log_normal", "cauchy", "random", "standard_gamma",
    "sample_dirichlet", "sample", "rsample", "empty", "empty_like", "new_empty", "empty_strided",
}


def call_name(node: fx.Node) -> str:
    return str(node.target) if node.op in ("call_module", "call_method") else getattr(node.target, "__name__", str(node.target))


def draws(node: fx.Node) -> bool:
    """A function or method call that draws random numbers (modules: :func:`topofx.ir.is_random`)."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = call_name(node).strip("_")
    legacy = name.endswith("Tensor")  # torch.FloatTensor(n, c, h, w): uninitialized, like torch.empty
    return legacy or name in RANDOM_NAMES or name.removesuffix("_like") in RANDOM_NAMES


def mutates(node: fx.Node) -> bool:
    """A function or method call that writes into its first argument (``x.add_(y)``, ``x[i] = y``)."""
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    name = call_name(node)
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace", False) is True


# Operations whose result may share storage with their first argument (a mutation of one is seen
# through the other); over-approximated on purpose: a false alias only adds an ordering constraint.
ALIASING_NAMES = {
    "getitem", "view", "view_as", "reshape", "reshape_as", "narrow", "select", "split", "split_with_sizes",
    "tensor_split", "chunk", "unbind", "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims",
    "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "contiguous", "t", "as_strided",
    "detach", "diagonal", "unfold", "real", "imag", "view_as_real", "view_as_complex", "to", "type",
    "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "requires_grad_", "align_as",
}


# Calls that read only their first argument's shape, dtype and device, never its values.
METADATA_NAMES = {
    "size", "dim", "numel", "new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
}


def target_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` mutates its first argument (``x.add_(y)``, ``ReLU(inplace=True)``, ``x[i] = y``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    return mutates(node)


def is_mutated(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether any user mutates ``node``'s value in place (passes leave such values alone)."""
    return any(is_inplace(u, gm) and u.args and u.args[0] is node for u in node.users)


def reads_mutated(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` reads a value that some node mutates in place (its order then matters)."""
    return any(is_mutated(arg, gm) for arg in node.all_input_nodes)


def is_random(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Draws random numbers, or cannot be vouched for (a user leaf module, a module with hooks)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        ours = type(mod).__module__.startswith("topofx.modules")
        return isinstance(mod, (nn.modules.dropout._DropoutNd, nn.RReLU)) or not (ours or module_config(mod) is not None)
    return draws(node)


def is_pure(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Deterministic and free of side effects (safe to compute once, or not at all when unused)."""
    if node.op in ("placeholder", "output"):
        return False
    if node.op == "get_attr":
        return True
    if is_random(node, gm) or is_inplace(node, gm) or node.is_impure():  # an FX `_assert` is impure
        return False
    if node.op == "call_module":
        # a module whose forward updates state (BN running stats) is impure in train mode
        return not any(True for _ in gm.get_submodule(node.target).buffers())
    return True


def stateless_module_key(node: fx.Node, gm: fx.GraphModule) -> Any:
    """The :func:`~topofx.ir.module_config` of a pure module call without parameters or buffers
    (a stock ``nn.Softmax``, ``nn.ReLU``, pooling), or None: two calls with equal keys on equal
    arguments compute one value.  Prefix sharing merges such calls and value numbering
    (:class:`topofx.topology.ValueNumbering`) numbers them alike, by this one test."""
    if node.op != "call_module" or not is_pure(node, gm):
        return None
    mod = gm.get_submodule(node.target)
    if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
        return None
    return module_config(mod)


def aliases(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s value may share storage with its first argument."""
    if node.op == "call_module":  # nn.Identity returns its input; unknown modules might
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.Identity) or is_random(node, gm)
    return is_view(node)


def reads_metadata(node: fx.Node) -> bool:
    """Whether a call reads only the shape, dtype or device of its first argument, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:2] in (("shape",), ("dtype",), ("device",), ("ndim",))
    return node.op in ("call_function", "call_method") and target_name(node) in METADATA_NAMES


def is_view(node: fx.Node) -> bool:
    """Whether a function or method call's value may share storage with its first argument
    (``x.view(...)``, ``x[i]``, ``x.data``)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:2] in (("data",), ("T",), ("mT",), ("H",), ("real",), ("imag",))
    return node.op in ("call_function", "call_method") and target_name(node).strip("_") in ALIASING_NAMES


class ModuleTable:
    """A graph module's ``graph`` and ``get_submodule`` by one dictionary lookup (thousands of calls)."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = gm.graph
        self._table = gm._table if isinstance(gm, ModuleTable) else dict(gm.named_modules(remove_duplicate=False))

    def get_submodule(self, target: str) -> nn.Module:
        return self._table[target]


@dataclasses.dataclass
class Effects:
    """What a graph's program order means beyond its data flow.

    * ``chain``: the impure calls (random draws, modules that cannot be vouched for, every call of
      a module with state that is called more than once) in program order -- moving one past
      another changes which random numbers each one gets, or which statistics a BN call sees;
    * ``accesses``: for every storage that some node mutates in place, all nodes reading or
      writing it (through any alias) in program order -- a read must stay on its side of a write.

    Recorded before a pass (when the order is the original's) and checked after it.
    """

    chain: list[fx.Node]
    accesses: list[list[fx.Node]]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "Effects":
        gm = ModuleTable(gm)  # type: ignore[assignment]  # get_submodule without walking paths
        nodes = list(gm.graph.nodes)
        calls: dict[int, int] = defaultdict(int)
        for n in nodes:
            if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).buffers()):
                calls[id(gm.get_submodule(n.target))] += 1
        chain = [n for n in nodes if n.op in ("call_module", "call_function", "call_method") and (
            is_random(n, gm) or (n.op == "call_module" and calls.get(id(gm.get_submodule(n.target)), 0) > 1))]
        root: dict[fx.Node, fx.Node] = {}  # alias classes (union-find over "may share storage")

        def find(n: fx.Node) -> fx.Node:
            while root.get(n, n) is not n:
                n = root[n]
            return n

        mutated = set()
        attrs: dict[str, fx.Node] = {}
        for n in nodes:
            if n.op == "get_attr":  # two reads of one attribute are one storage
                root[find(n)] = find(attrs.setdefault(n.target, n))
            first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if first is not None and (aliases(n, gm) or is_inplace(n, gm)):
                root[find(n)] = find(first)
            if first is not None and is_inplace(n, gm):
                mutated.add(n)
        classes: dict[fx.Node, list[fx.Node]] = {}
        for n in mutated:
            classes.setdefault(find(n), [])
        for n in nodes:  # an access: a node that uses a member of a mutated class
            for base in {find(a) for a in n.all_input_nodes} & classes.keys():
                classes[base].append(n)
        return cls(chain, [acc for acc in classes.values() if any(a in mutated for a in acc)])

    def order_edges(self, alive: set[fx.Node], gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
        """``(a, b)``: a must run before b (restricted to nodes still in the graph)."""
        gm = ModuleTable(gm)  # type: ignore[assignment]
        chain = [n for n in self.chain if n in alive]
        edges = list(zip(chain, chain[1:]))
        for acc in self.accesses:
            acc = [n for n in acc if n in alive]
            for i, n in enumerate(acc):
                if is_inplace(n, gm):
                    edges += [(a, n) for a in acc[:i]] + [(n, b) for b in acc[i + 1:]]
        return edges

    def _settled_read(self, acc: list[fx.Node], new: list[fx.Node], position: dict[fx.Node, int], gm: Any) -> bool:
        """Whether the new readers of a mutated storage read its final value, as every original reader
        does: the storage was written first and only read after its last write (DARTS-PT's projected
        rows: ``weights[e].data.copy_(proj)`` at the top of forward), and the new nodes come after that
        write.  (Views taken to write through do not read, nor do reads of its shape alone: drop-path's
        ``x.new_empty(x.size(0), 1, 1, 1)`` before it writes into ``x``.)"""
        recorded = next((r for r in self.accesses if set(r) & set(acc)), None)
        if recorded is None:
            return False
        recorded = [n for n in recorded if n in position]
        writes = [i for i, n in enumerate(recorded) if is_inplace(n, gm)]
        reads = [i for i, n in enumerate(recorded)
                 if not is_inplace(n, gm) and not aliases(n, gm) and not reads_metadata(n)]
        if not writes or any(i < writes[-1] for i in reads):
            return False
        last_write = max(position[n] for n in acc if is_inplace(n, gm))
        return all(position[n] > last_write for n in new)

    def violation(self, gm: fx.GraphModule) -> str | None:
        """Why the graph no longer keeps the recorded order, or None."""
        gm = ModuleTable(gm)  # type: ignore[assignment]
        nodes = list(gm.graph.nodes)
        position = {n: i for i, n in enumerate(nodes)}
        lost = [n.name for n in self.chain if n not in position]
        if lost:
            return f"it removed the random/opaque call(s) {', '.join(lost)}"
        now = Effects.of(gm)  # type: ignore[arg-type]
        recorded = set(self.chain)
        if [n for n in now.chain if n in recorded] != self.chain:
            return "it reordered random draws (or calls of one stateful module)"
        if len(now.chain) != len(self.chain):
            return "it added a random/opaque call"
        old = set().union(*map(set, self.accesses)) if self.accesses else set()
        for acc in now.accesses:
            new = [n for n in acc if n not in old]
            if new and not self._settled_read(acc, new, position, gm):
                return f"new node(s) {', '.join(n.name for n in new)} read a value that is mutated in place"
        for acc in self.accesses:
            kept = [n for n in acc if n in position]
            for i, n in enumerate(kept):
                if is_inplace(n, gm):
                    if any(position[a] > position[n] for a in kept[:i]) or any(position[b] < position[n] for b in kept[i + 1:]):
                        return f"it moved a read of {n.args[0].name} across its in-place update {n.name}"
        return None


# ---------------------------------------------------------------------------------------------
# module signature
# ---------------------------------------------------------------------------------------------
# One canonical signature of a module's output-relevant configuration.  Only what the signature can
# vouch for qualifies: a *stock* ``torch.nn`` class (exact type, so a user subclass with its own
# ``forward`` never does), no hooks of its own, and no instance attribute beyond the class's declared
# configuration (``__constants__``, which TorchScript relies on to hold exactly the values ``forward``
# reads) -- an instance ``forward`` override, a parametrization, a ``weight_norm`` pre-hook or an
# attribute set by user code makes the module unknown, and unknown modules are never shared, fused or
# merged.

# instance attributes every nn.Module has, and ones stock classes set besides __constants__
_MODULE_INTERNALS = {"training"}
_DERIVED = {nn.modules.conv._ConvNd: {"transposed"}}
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _declared(cls: type) -> set[str]:
    names = set(getattr(cls, "__constants__", ())) | _MODULE_INTERNALS
    for base, extra in _DERIVED.items():
        if issubclass(cls, base):
            names |= extra
    return names


def is_stock(module: nn.Module) -> bool:
    """A ``torch.nn`` class (not a subclass defined elsewhere) without hooks of its own."""
    cls = type(module)
    return (
        cls.__module__.startswith("torch.nn.modules.")
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        and not getattr(module, "_backward_pre_hooks", None)
    )


def module_config(module: nn.Module, ignore: Iterable[str] = ()) -> Hashable | None:
    """``(type, settings, tensors)`` of a stock module, or ``None`` when it cannot be vouched for.

    ``settings`` are all public instance attributes but ``ignore`` (which a pass handles itself,
    e.g. ``out_channels`` for a concatenation); ``tensors`` are the presence, dtype, device and
    ``requires_grad`` of every parameter and buffer slot (``bias=None`` included).
    """
    if not is_stock(module):
        return None
    declared = _declared(type(module))
    settings = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_"):
            continue
        if key not in declared or not _plain(value):
            return None  # an attribute the signature cannot vouch for (instance forward, user data, ...)
        if key not in ignore:
            settings.append((key, value))
    tensors = tuple(
        (kind, name, None if t is None else (t.dtype, t.device, t.requires_grad))
        for kind, table in (("p", module._parameters), ("b", module._buffers))
        for name, t in sorted(table.items())
    )
    return (type(module), tuple(settings), tensors)


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_state(*modules: nn.Module, tensors: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Restore parameters, buffers, extra tensors, their grads and the RNG states (torch's CPU one and the
    host generators, :func:`host_generators`) on exit."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            seen[id(t)] = t
    for t in tensors:
        seen[id(t)] = t
    saved = [(t, t.detach().clone(), t.grad) for t in seen.values()]
    rng, host = torch.get_rng_state(), host_rng_state(*modules)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value, grad in saved:
                restore_value(t, value)
                t.grad = grad
        torch.set_rng_state(rng)
        set_host_rng_state(host)


def restore_value(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``t`` where they differ.  An unchanged tensor is left alone: an in-place copy
    would move its version counter, and a tensor computed from it before the call (an optimizer's
    sample, ``topofx.capture.tensor_inputs``) could no longer backpropagate through it."""
    if not torch.equal(t, value):
        t.copy_(value)


def float_leaves(out: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    fx.node.map_aggregate(out, lambda x: leaves.append(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None)
    return leaves


def max_rel_error(a: Any, b: Any) -> float:
    """Largest relative difference between the floating tensors of two output structures.

    Relative to ``max(max|b|, 1e-6)``: a tensor that is pure rounding noise (a sampled architecture
    that zeroes a whole cell gives features of ~1e-11) is compared absolutely.
    """
    la, lb = float_leaves(a), float_leaves(b)
    if len(la) != len(lb):
        return math.inf
    err = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return math.inf
        scale = max(y.detach().abs().max().item(), 1e-6) if y.numel() else 1.0
        err = max(err, ((x.detach() - y.detach()).abs().max().item() / scale) if x.numel() else 0.0)
    return err


def graph_attr_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Tensors the graph reads with ``get_attr`` that require grad (architecture weights and such)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.requires_grad:
                out.append(obj)
    return out


def float64_copies(modules: tuple[nn.Module, ...], inputs: Sequence[Any], tensors: Sequence[torch.Tensor] = ()
                   ) -> tuple[tuple[nn.Module, ...], tuple, list[torch.Tensor], dict]:
    """Float64 copies of ``modules`` (one ``deepcopy``, so what they share stays shared), of the inputs,
    the copies of ``tensors``, and the deepcopy's memo (``id`` of an original -> its copy).  Every tensor is
    converted in place (``.data``), so each stays one object: a graph may hold an architecture tensor as a
    buffer and the original as an attribute, and a lowered batch norm holds the very running statistics
    of the user's module -- a converted copy per module would part them."""
    memo: dict = {}
    copies = copy.deepcopy(modules, memo)
    tensors64 = [memo.get(id(t), t) for t in tensors]
    for t in (*tensors64, *(t for m in copies for t in (*m.parameters(), *m.buffers()))):
        if t.is_floating_point():
            t.data = t.data.double()
    double = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return copies, tuple(map(double, inputs)), tensors64, memo


def run_seeded(module: nn.Module, inputs: Sequence[Any], seed: int = 0) -> Any:
    """Run ``module`` from a fixed RNG state (random draws inside forward line up across runs)."""
    seed_all(seed, module)
    return module(*inputs)


def seed_all(seed: int, *modules: nn.Module) -> None:
    """Seed torch's CPU generator and the host generators (:func:`host_generators`) of ``modules``: a method
    run per call may draw from any of them (``topofx.capture.host_random``)."""
    torch.manual_seed(seed)
    for generator in host_generators(*modules):
        if isinstance(generator, random.Random):
            generator.seed(seed)
        else:
            bits = _bit_generator(generator)
            bits.state = type(bits)(seed).state


def host_generators(*modules: nn.Module) -> list[Any]:
    """Random generators outside torch that forward can draw from: Python's ``random`` module and NumPy's
    global one (where the program imported NumPy), and every ``random.Random``, NumPy ``RandomState`` or
    ``Generator`` held as an attribute by a submodule of ``modules`` or as a global of the file that
    defines a submodule's class."""
    numpy = sys.modules.get("numpy")
    kinds: tuple[type, ...] = (random.Random,) + ((numpy.random.RandomState, numpy.random.Generator) if numpy else ())
    found = {id(random._inst): random._inst}  # type: ignore[attr-defined]
    if numpy is not None:
        found[id(numpy.random.mtrand._rand)] = numpy.random.mtrand._rand
    submodules = {id(m): m for root in modules for m in root.modules()}.values()
    files = {type(m).__module__ for m in submodules}  # each defining file's globals read once, not per module
    namespaces = [vars(m) for m in submodules] + [vars(sys.modules[f]) for f in files if f in sys.modules]
    for value in (v for namespace in namespaces for v in namespace.values()):
        if isinstance(value, kinds):
            found[id(value)] = value
    return list(found.values())


def host_rng_state(*modules: nn.Module, generators: Sequence[Any] | None = None) -> list[tuple[Any, Any]]:
    """Each host generator of ``modules`` (:func:`host_generators`; or ``generators``) with its state."""
    return [(g, _state(g)) for g in (host_generators(*modules) if generators is None else generators)]


def set_host_rng_state(saved: list[tuple[Any, Any]]) -> None:
    """Put back what :func:`host_rng_state` returned."""
    for generator, state in saved:
        if isinstance(generator, random.Random):
            generator.setstate(state)
        else:
            _bit_generator(generator).state = state


def host_rng_changed(saved: list[tuple[Any, Any]]) -> bool:
    """Whether a generator of ``saved`` (:func:`host_rng_state`) drew since."""
    return any(_comparable(state) != _comparable(_state(g)) for g, state in saved)


def _state(generator: Any) -> Any:
    return generator.getstate() if isinstance(generator, random.Random) else _bit_generator(generator).state


def _bit_generator(generator: Any) -> Any:
    """A NumPy ``Generator``'s or legacy ``RandomState``'s bit generator."""
    return getattr(generator, "bit_generator", None) or generator._bit_generator


def _comparable(state: Any) -> Any:
    """A generator's state with NumPy arrays as bytes (an array's ``==`` is elementwise)."""
    if isinstance(state, dict):
        return {k: _comparable(v) for k, v in state.items()}
    return state.tobytes() if hasattr(state, "tobytes") else state

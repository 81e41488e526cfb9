"""``simplify(model, example_inputs)``: the method's outline in one function.

1. capture the unmodified supernet as an FX graph (``topofx.capture``);
2. rewrite the weighted joins written other than as ``+`` chains (stacked candidates reduced with
   ``sum``/``einsum``/``tensordot``/``matmul``, in-place ``add_`` accumulation) into ``+`` chains
   (:func:`canonicalize`), then find the mixed edges, inputs, candidates and cells
   (``topofx.topology``);
3. rewrite the redundant parallel paths to a fixpoint (``topofx.passes`` via ``topofx.rewrite``),
   then lower the result (topo mode's fused weighted sums; the channels-last layout when asked);
   a sampled supernet's graph (an adapter's gates) gets the exact rewrites and runs sparsely
   (``topofx.sparse``: per call, only what the selected candidates need);
4. check the result against the original on the example inputs;
5. hand back a drop-in :class:`SimplifiedModule`.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import capture as _capture
from .adapters import RelaxedForward, adapter_for
from .capture.guards import Guards, retraces_same
from .capture.tensor_inputs import as_leaves
from .codegen import direct_module_calls
from .ir import DECIDED_PER_CALL, SPECULATION, VALUE_GUARD, host_rng_state, set_host_rng_state
from .modules import MergedConvBN, to_channels_last
from .passes.functional_modules import SERVED_TRAINING
from .report import Report
from .rewrite import node_counts, run_to_fixpoint
from .selfcheck import SelfCheck
from .sparse import SparseForward, gateable, gates, run_sparsely, weighted_or_gated
from .topology import analyze

MODES = ("topo", "exact")
LAYOUTS = ("keep", "channels_last")
FLOATED = "topofx_floated"  # state_dict / named_buffers prefix of the floated BNs' new running statistics
RECAPTURE_WARN_CALLS = 10  # a value decision that changes again within this many calls gets a warning
MAX_GRAPHS = 8  # graphs kept per simplified module, one per choice of forward's non-tensor arguments
_TENSOR = itertools.repeat(torch.Tensor)  # ``map(isinstance, args, _TENSOR)``: no generator frame per call


class SelfCheckError(RuntimeError):
    """``strict=True``: the simplified graph failed the self-check (``topofx.selfcheck``)."""


class SimplifiedModule(nn.Module):
    """A drop-in replacement for a supernet that runs its simplified graph.

    It *is* the original for everything but ``forward``: it shares the original's parameter,
    buffer and submodule dictionaries (so ``parameters()``, ``named_parameters()``,
    ``state_dict()`` keys and ``.to()`` act on the very same objects), and forwards unknown
    attributes and methods (``genotype()``, ``arch_parameters()``, ...) to the original.
    Before each call it checks what the captured graph assumed (:mod:`topofx.capture.guards`); the floated
    BNs' new statistics (topo mode) are in ``state_dict()`` and ``named_buffers()`` under
    ``topofx_floated.*`` (``docs/dropin.md``).
    """

    def __init__(
        self, original: nn.Module, graph_module: fx.GraphModule | None, report: Report, example_inputs: tuple = ()
    ):
        super().__init__()
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._modules = original._modules
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self.__dict__["original"] = original
        self.__dict__["graph_module"] = graph_module
        self.__dict__["report"] = report
        self.__dict__["example_inputs"] = example_inputs
        self.training = original.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.graph_module is None:
            return self.original(*args, **kwargs)
        serving = self.serving(args, kwargs)
        if serving is not self:
            return serving(*args, **kwargs)
        if self.__dict__.get("graph_training") not in (None, self.training):
            return self.original(*args, **kwargs)  # forward branches on self.training: other mode runs eagerly
        verdict = self.guards.verdict(args)
        if verdict == "recapture" or self.__dict__.pop("stale", False):
            self.recapture()
            return self(*args, **kwargs)
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        if verdict == "eager":  # this input shape takes another Python path than the example's
            return self.original(*args, **kwargs)
        if self.__dict__.get("relaxed") is None and self.graph_module.meta.get(SPECULATION):
            return self._run_speculating(args, kwargs)
        return self._run_graph(*args, **kwargs)

    def _run_graph(self, *args: Any, **kwargs: Any) -> Any:
        """One run of the graph, all checks done: its runner; with an adapter, the adapter's sampling step
        (the original's own draws: GDAS) around the sparse executor's run of a sampled graph
        (``topofx bench --overhead`` times everything else a call does)."""
        relaxed = self.__dict__.get("relaxed")
        if relaxed is None:
            return self.runner(*args, **kwargs)
        relaxed.resample(self.graph_module)  # an adapter's opaque sampling step (GDAS), then the graph
        try:
            sparse = self.__dict__.get("sparse")
            return sparse(self.graph_module, *args, **kwargs) if sparse else self.runner(*args, **kwargs)
        finally:
            relaxed.release(self.graph_module)

    def _run_speculating(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run the graph; when a decision forward takes on a random draw comes out otherwise than at
        capture (its check runs before any state changes: ``capture.hoist_speculation``), restore the
        RNG, run the original's eager forward for this call, and capture again before the next one --
        with the deciding module or method run per call if the decision changed soon after capture.  Only for a
        graph that speculates (``forward`` runs any other directly)."""
        speculated = self.graph_module.meta[SPECULATION]
        devices = _cuda_devices(args) if torch.cuda.is_initialized() else []  # no CUDA tensor without CUDA
        before = _rng_states(devices)  # what a failed speculation (or any error) leaves; a success moves on
        try:
            return self._run_graph(*args, **kwargs)
        except _capture.SpeculationFailed as failed:
            _set_rng_states(devices, before)
            result = failed
        except BaseException:
            _set_rng_states(devices, before)
            raise
        decision, root = speculated[result.index], self.guards.root
        key = _capture.unit_key(root, decision.unit) if decision.unit is not None else None
        if key is not None and self.__dict__.get("calls", 0) < RECAPTURE_WARN_CALLS:
            _capture.PER_CALL.setdefault(root, set()).add(key)
            warnings.warn(
                f"topofx: {type(self.original).__name__} decides on random draws at {decision.frame}, which came out "
                f"otherwise on call {self.__dict__.get('calls', 0)} than at capture; {_capture.unit_name(root, key)} "
                "now runs per call as one node, as written",
                stacklevel=4,
            )
        self.__dict__["stale"] = True
        return self.original(*args, **kwargs)

    @property
    def runner(self) -> Callable:
        """What runs the graph: its compiled form after :meth:`compile`, else the graph module."""
        compiled = self.__dict__.get("compiled")
        return self.graph_module if compiled is None else compiled

    def compile(self, **options: Any) -> "SimplifiedModule":  # type: ignore[override]
        """Run the simplified graph through ``torch.compile(graph_module, **options)`` from now on
        (``mode="reduce-overhead"`` adds CUDA graphs; ``docs/compile.md``).

        Only the graph is compiled: the drop-in guards keep running in Python before each call, and a
        change they catch captures, simplifies and compiles again.  Architecture weights are the graph's
        parameters, which ``torch.compile`` takes as inputs, so one compiled graph serves every alpha
        value.  A sampled supernet's sparse forward stays eager, with a warning: its work changes with
        every sample (``docs/compile.md`` has the measurements)."""
        self.__dict__["compile_options"] = options
        self.__dict__["compiled"] = None
        if self.graph_module is None:
            return self
        if self.__dict__.get("sparse") is not None:
            warnings.warn(f"topofx: {type(self.original).__name__} runs sparsely (only each call's selected candidates); "
                          "its forward stays eager, not compiled: every sample would be another graph (docs/compile.md)",
                          stacklevel=2)
            return self
        self.__dict__["compiled"] = torch.compile(self.graph_module, **options)
        return self

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``deepcopy``: DARTS-V2's unrolled model) compiles its own graph, not a copy of ours."""
        state = self.__dict__.copy()
        state.pop("compiled", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "compile_options" in state:
            self.compile(**state["compile_options"])

    def serving(self, args: tuple, kwargs: dict[str, Any]) -> nn.Module:
        """The module that serves a call: this graph when the call's non-tensor arguments (``updateType``,
        defaults included) are the ones it was captured with, otherwise a graph captured for theirs
        (once per choice, kept) -- or the original's eager forward, with a warning, for a value that
        cannot be a cache key, or past ``MAX_GRAPHS`` choices."""
        function = getattr(self.original.forward, "__func__", None)
        tensors_only = not kwargs and function is not None and all(map(isinstance, args, _TENSOR))
        if tensors_only and self.__dict__.get("tensor_call") == (function, len(args)):
            return self  # tensors alone bind to forward's signature (cached per function) the same way every time
        try:
            key = _capture.call_key(self.original, args, kwargs)
        except TypeError:  # a call forward() rejects: the original raises the user's own error
            return self.original
        if key is None:
            return self._eager_for("an argument value that cannot be told apart by hash (a list or a dict)",
                                   "Pass a tuple, number, string or tensor to have each choice captured.")
        if key == self.__dict__.get("call_key", key):
            if tensors_only:
                self.__dict__["tensor_call"] = (function, len(args))
            return self
        others = self.__dict__.setdefault("other_graphs", {})
        if key not in others:
            if len(others) + 1 >= MAX_GRAPHS:
                return self._eager_for(f"more than {MAX_GRAPHS} different values of its non-tensor arguments",
                                       "Pass a value that changes every step (a drop rate) as a tensor, or keep it "
                                       "on the model.")
            others[key] = self._simplified_for(args, kwargs)
        return others[key]

    def _simplified_for(self, args: tuple, kwargs: dict[str, Any]) -> "SimplifiedModule":
        """Simplify the original again for another choice of non-tensor arguments (this call's tensors
        serve as example inputs); floated-BN statistics start from this graph's."""
        bound = _capture.bind_call(self.original, args, kwargs) if not _capture.has_var_args(self.original) else None
        examples = tuple(bound.args if bound is not None else args)
        if bound is not None and bound.kwargs:
            return self._eager_for("a keyword-only argument", "Make it an ordinary (positional-or-keyword) parameter "
                                   "to have each choice captured.")
        examples = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in examples)
        with torch.inference_mode(False), torch.enable_grad():
            other = simplify(self.original, examples, **self.__dict__["options"])
        other.train(self.training)
        other._load_floated(self.floated_buffers())
        if "compile_options" in self.__dict__:
            other.compile(**self.__dict__["compile_options"])
        return other

    def _eager_for(self, why: str, fix: str) -> nn.Module:
        if why not in self.__dict__.setdefault("eager_warned", set()):
            self.__dict__["eager_warned"].add(why)
            warnings.warn(
                f"topofx: {type(self.original).__name__}.forward was called with {why}; such calls run the "
                f"original's eager forward (correct, not simplified). {fix}",
                stacklevel=4,
            )
        return self.original

    def _load_floated(self, theirs: dict[str, torch.Tensor]) -> None:
        """Start the floated BNs' statistics from another graph's, where names and shapes match."""
        with torch.no_grad():
            for name, buf in self.floated_buffers().items():
                if name in theirs and theirs[name].shape == buf.shape:
                    buf.copy_(theirs[name])

    def recapture(self) -> None:
        """Simplify the original again (after a change the captured graph baked in, e.g. a Gumbel
        temperature read as a Python number); floated-BN running statistics carry over."""
        self._before_recapture()
        start = time.perf_counter()
        floated = self.floated_buffers()
        like = next(self.original.parameters(), None)  # the model may have moved since (.to(), .double())
        examples = tuple(
            x.to(like.device, like.dtype if x.is_floating_point() else x.dtype)
            if isinstance(x, torch.Tensor) and like is not None else x
            for x in self.example_inputs
        )
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(examples[0].device.type, enabled=False):
            fresh = simplify(self.original, examples, **self.__dict__["options"])
        fresh._load_floated(floated)
        self.__dict__.update(calls=0, recaptured=True, recapture_s=time.perf_counter() - start)
        for key in ("graph_module", "report", "relaxed", "sparse", "guards", "graph_training", "lowered_for"):
            self.__dict__[key] = fresh.__dict__.get(key)
        if self.graph_module is None:  # the fresh capture fell back (and warned): the original runs eagerly
            return
        self.graph_module.train(self.training)
        if "compile_options" in self.__dict__:
            self.compile(**self.__dict__["compile_options"])

    def _before_recapture(self) -> None:
        """A Python decision on architecture values, or a module attribute the graph baked in (a sampled
        path's index that ``resample()`` sets), that changes again within a few calls would cost a capture
        every few steps: the module forward or method that reads it runs per call from now on, as one node
        with the original's Python (``capture.PER_CALL``); one in the model's own forward keeps being
        captured anew, with one warning."""
        root, guards = self.guards.root, self.guards
        since = self.__dict__.get("calls", 0)
        if not (guards.changed or guards.moved) or not self.__dict__.get("recaptured") or since >= RECAPTURE_WARN_CALLS:
            return
        what = "; ".join(dict.fromkeys([*(str(d.frame) for d in guards.changed),
                                        *(f"{type(m).__name__}.{k}" for m, k in guards.moved)]))
        units = {key for d in guards.changed if d.unit is not None and (key := _capture.unit_key(root, d.unit))}
        units |= {key for m, _ in guards.moved if m is not root and (key := _capture.unit_key(root, m))}
        if units:
            _capture.PER_CALL.setdefault(root, set()).update(units)
            names = ", ".join(_capture.unit_name(root, key) for key in sorted(units))
            warnings.warn(
                f"topofx: {type(self.original).__name__} decides in Python on values that changed again after "
                f"{since} call(s) ({what}); from now on {names} {'runs' if len(units) == 1 else 'run'} per call "
                "(one node, as written) instead of being captured anew at every change",
                stacklevel=4,
            )
        elif not self.__dict__.get("recapture_warned"):
            self.__dict__["recapture_warned"] = True
            warnings.warn(
                f"topofx: {type(self.original).__name__}.forward decides in Python on values that changed again "
                f"after {since} call(s) ({what}); every change captures the model anew "
                f"(last time {self.__dict__.get('recapture_s', 0.0):.1f} s). Compute the decision with tensor operations, "
                "or in a method or submodule (which then runs per call), if it changes every step "
                "(results stay correct either way).",
                stacklevel=4,
            )

    def floated_buffers(self) -> dict[str, torch.Tensor]:
        """New buffers of the graph (floated BNs' running statistics), by their ``state_dict`` key."""
        if self.graph_module is None:
            return {}
        return {
            f"{FLOATED}.{name}": buf
            for path, m in self.graph_module.named_modules() if isinstance(m, MergedConvBN)
            for name, buf in m.floated.named_buffers(prefix=f"{path}.floated")
        }

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        yield from super().named_buffers(prefix, recurse, remove_duplicate)
        if recurse:
            for name, buf in self.floated_buffers().items():
                yield (f"{prefix}.{name}" if prefix else name), buf

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, buf in self.floated_buffers().items():
            destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        """Floated statistics load when present and are optional (an original's checkpoint has none)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, buf in self.floated_buffers().items():
            key = prefix + name
            if key not in state_dict:
                continue
            if state_dict[key].shape != buf.shape:
                error_msgs.append(f"size mismatch for {key}: copying {tuple(state_dict[key].shape)}, here {tuple(buf.shape)}")
                continue
            with torch.no_grad():
                buf.copy_(state_dict[key])
            if key in unexpected_keys:
                unexpected_keys.remove(key)

    def train(self, mode: bool = True) -> "SimplifiedModule":
        super().train(mode)
        self.original.training = mode
        if self.graph_module is not None:
            self.graph_module.train(mode)
        for other in self.__dict__.get("other_graphs", {}).values():
            other.train(mode)
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """``.to()``, ``.cuda()``, ``.double()``: the graph's own modules follow; a move to another device
        type lowers the graph for it again (``simplify``'s lowering passes are chosen per device) on the
        next call."""
        super()._apply(fn, recurse)
        for simplified in (self, *self.__dict__.get("other_graphs", {}).values()):
            simplified._follow(fn, recurse)
        return self

    def _follow(self, fn: Callable, recurse: bool) -> None:
        if self.graph_module is not None:
            self.graph_module._apply(fn, recurse)
            self.guards.graph_changed()
            moved = device_type(self.original, ()) != self.__dict__.get("lowered_for")
            self.__dict__["stale"] = self.__dict__.get("stale", False) or moved

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def _own(self, name: str) -> bool:
        """Whether ``name`` is this module's own state (set up in ``__init__``, kept in ``__dict__``, or
        a descriptor of its class) rather than an attribute of the original it stands in for.  A module
        whose parameter dictionary is no longer the original's (``nn.DataParallel``'s replicas get their
        own, then have tensors and flags set on them) keeps everything assigned to it."""
        original = self.__dict__.get("original")
        return (original is None or name in self.__dict__ or hasattr(type(self), name)
                or self.__dict__.get("_parameters") is not original._parameters)

    def __setattr__(self, name: str, value: Any) -> None:
        """A search loop's ``model.T = 0.5`` / ``model.phase = 'search'`` on the module it holds sets the
        original's attribute, where forward reads it (and the guards see it): on this module it would
        be a copy the graph never reads."""
        if self._own(name):
            super().__setattr__(name, value)
        else:
            setattr(self.__dict__["original"], name, value)

    def __delattr__(self, name: str) -> None:
        if self._own(name):
            super().__delattr__(name)
        else:
            delattr(self.__dict__["original"], name)

    def __repr__(self) -> str:
        return f"SimplifiedModule({type(self.original).__name__}, mode={self.report.mode})"


def _cuda_devices(args: tuple) -> list[int]:
    """The CUDA devices of the tensor arguments: the generators a failed speculation restores."""
    return sorted({x.device.index or 0 for x in args if isinstance(x, torch.Tensor) and x.is_cuda})


def _rng_states(devices: list[int]) -> tuple:
    """The CPU generator's state (``torch.get_rng_state()``, without its wrapper: taken before every call
    of a graph with speculations) and the ``devices``' CUDA generators'."""
    return torch.default_generator.get_state(), [torch.cuda.get_rng_state(d) for d in devices] if devices else []


def _set_rng_states(devices: list[int], state: tuple) -> None:
    torch.default_generator.set_state(state[0])
    for device, cuda_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(cuda_state, device)


def _passes_for(mode: str, layout: str, sampled: bool = False, device: str = "cpu") -> tuple[tuple, tuple]:
    """The rewrites (run to a fixpoint) and the lowering passes (run after them) for a mode, a layout
    and the device type the model runs on (passes that serve other devices are left out).
    A sampled graph (gates) takes the exact rewrites in both modes: its edges are one-hot on every
    call, where merging buys nothing and would change the original's gradients; topo mode still
    lowers its depthwise convolutions."""
    from topofx.passes import EXACT_PASSES, TOPO_LOWERING, TOPO_PASSES, channels_last, depthwise_layout, for_device

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(map(repr, LAYOUTS))}")
    if sampled:
        rewrites, lowering = EXACT_PASSES, ((depthwise_layout,) if mode == "topo" else ())
    else:
        rewrites, lowering = (EXACT_PASSES, ()) if mode == "exact" else (TOPO_PASSES, TOPO_LOWERING)
    lowering += (channels_last,) if layout == "channels_last" else ()
    return for_device(rewrites, device), for_device(lowering, device)


def device_type(model: nn.Module, example_inputs: tuple) -> str:
    """Where the model runs: its example inputs' device, else its parameters'."""
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor)), None)
    first = first if first is not None else next(model.parameters(), None)
    return first.device.type if first is not None else "cpu"


def simplify(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    mode: str = "topo",
    *,
    strict: bool = False,
    check: bool = True,
    layout: str = "keep",
    compile: bool | dict[str, Any] = False,
) -> SimplifiedModule:
    """Capture ``model``, rewrite its redundant parallel paths, and return a drop-in module.

    Args:
        model: the unmodified supernet (any ``nn.Module``).
        example_inputs: a tensor or tuple of tensors that ``model`` accepts.
        mode: ``"topo"`` (default; TopoNAS floating + kernel-normalized merge, vertex-exact) or
            ``"exact"`` (outputs, gradients and BN statistics equal the original's).
        strict: raise :class:`~topofx.capture.CaptureError` instead of falling back to eager
            control flow when the network cannot be captured as one graph.
        check: run one training step of the simplified graph on ``example_inputs`` against the
            original (exact mode) or, at a one-hot vertex, against the graph as captured (topo mode):
            outputs, parameter and architecture gradients, BN statistics (``topofx.selfcheck``).
            On a difference keep the original's eager forward with a warning naming the pass that
            introduced it (``strict=True``: raise :class:`SelfCheckError`).
        layout: ``"keep"`` (default) leaves memory layouts as the original has them;
            ``"channels_last"`` runs the graph's image tensors in channels-last layout on the CPU,
            where oneDNN's narrow and depthwise convolutions are several times faster (see
            docs/benchmarks.md).  Same operations, but PyTorch's channels-last kernels round
            differently (batch-norm statistics most: ~1e-4 relative on near-constant channels), so
            outputs equal the original's *fed channels-last input* rather than the original's.
        compile: ``True`` or a dict of ``torch.compile`` options (``{"mode": "reduce-overhead"}``): run
            the simplified graph compiled (:meth:`SimplifiedModule.compile`; the self-check runs eagerly).

    The lowering passes serve the device the model runs on (its example inputs' device): the CPU's
    pooling and layout lowerings are left out on CUDA; ``.to()`` another device type lowers anew.
    The caller's random streams are left as they were (:func:`_callers_random_state`).
    """
    with _callers_random_state(model):
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        example_inputs = tuple(example_inputs)
        _passes_for(mode, layout)  # unknown names fail before any work
        name = type(model).__name__
        adapter, root, live, captured = _capture_sampling(model, example_inputs, mode, strict)
        if captured.graph_module is None:
            report = Report(name, mode, [], {}, {}, fallback=captured.fallback_reason)
            return SimplifiedModule(model, None, report, example_inputs)
        gm = captured.graph_module
        captured_code = _capture.fingerprint(gm)
        with as_leaves(gm):  # the checks run many steps on the one tensor sampled before the call
            branches_on_training = _branches_on_training(root, example_inputs, captured_code)
            gm.meta[SERVED_TRAINING] = root.training if branches_on_training else None  # passes/functional_modules.py
            before = node_counts(gm)
            canonical = canonicalize(gm, root, example_inputs, live)
            topology = analyze(gm.graph, root)
            edges = analyze(gm.graph, root, terms=weighted_or_gated) if gates(gm) else topology  # as reported
            sampled = any(gateable(gm, g, live) for g in gates(gm))
            lowered_for = device_type(model, example_inputs)
            passes, lowering = _passes_for(mode, layout, sampled, lowered_for)
            self_check = SelfCheck(model, gm, topology, example_inputs, mode, live) if check else None
            runs = canonical + _rewrite(gm, root, passes, lowering, example_inputs, owners=edges.owners())
            direct_module_calls(gm)  # the code the checks below run, and every call after them
            check_inputs = _check_inputs(runs, example_inputs)
            problem = None if _capture.hoist_speculation(gm) else (
                "the rewritten graph cannot check its decisions on random draws before it changes any state")
            problem = problem or (self_check(gm, check_inputs) if self_check else None)
            sparse = SparseForward(gm, live) if sampled else None
            problem = problem or (sparse.check(gm, check_inputs) if sparse and check else None)
            if problem:
                _refuse(model, root, example_inputs, check_inputs, mode, passes, lowering, live, problem, strict,
                        gm.meta[SERVED_TRAINING])
        if problem:
            if adapter:
                root.release(gm)
            report = Report(name, mode, runs, before, before, fallback=f"self-check failed: {problem}")
            return SimplifiedModule(model, None, report, example_inputs)
        guard = gm.meta.get(VALUE_GUARD)
        report = Report(name, mode, runs, before, node_counts(gm), len(edges.edges), len(edges.cells()),
                        adapter=adapter.description if adapter else None,
                        sparse=len(sparse.gates) if sparse else 0,
                        decided_per_call=tuple(gm.meta.get(DECIDED_PER_CALL, ())),
                        value_decisions=len(guard.checks) if guard else 0)
        _warn_rejected(name, runs)
        simplified = SimplifiedModule(model, gm, report, example_inputs)
        if adapter:
            root.release(gm)  # samples drawn while verifying and rewriting
        simplified.__dict__.update(relaxed=root if adapter else None, sparse=sparse, lowered_for=lowered_for,
                                   options=dict(mode=mode, strict=strict, check=check, layout=layout),
                                   call_key=_capture.call_key(model, example_inputs),
                                   guards=Guards(root, gm, captured_code, example_inputs))
        if compile is not False and compile is not None:  # {}: compile with torch.compile's defaults
            simplified.compile(**(compile if isinstance(compile, dict) else {}))
        if branches_on_training:
            simplified.__dict__["graph_training"] = root.training
            warnings.warn(
                f"topofx: {name}.forward takes a different path in {'eval' if root.training else 'train'} mode "
                f"(Python code reads self.training); the simplified graph serves {'train' if root.training else 'eval'} "
                "mode and the other mode runs the original's eager forward",
                stacklevel=2,
            )
        return simplified



@contextlib.contextmanager
def _callers_random_state(model: nn.Module) -> Iterator[None]:
    """Restore torch's CPU and initialized CUDA generators and the host generators (Python's ``random``,
    NumPy's global one, the model's own: ``topofx.ir.host_generators``) on exit: capture, its verification,
    the rewrites' meta runs and the self-check run the user's code for real (a recorded helper that allocates and draws, a forward that calls ``random``),
    and a search loop must see the same draws after ``simplify`` -- also one made inside a call, for a
    new argument value -- as without it."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    host = host_rng_state(model)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            set_host_rng_state(host)


def _capture_sampling(model: nn.Module, example_inputs: tuple, mode: str, strict: bool) -> tuple:
    """``(adapter, root, sample names, capture)``: through the model's adapter when it has one (its
    sampling lifted out of forward, ``topofx.adapters``), else the model itself.  Exact mode keeps the
    adapter only when every candidate it relaxes is gated for sparse execution: a plain weighted sum
    gives the unselected weights another gradient than the original's."""
    adapter = adapter_for(model)
    if adapter is not None:
        root = RelaxedForward(model, adapter)
        captured = _capture.capture(root, example_inputs, strict=strict, live_attrs=root.sample_names, stacklevel=4)
        gm = captured.graph_module
        relaxed_exactly = gm is not None and bool(gates(gm)) and all(
            gateable(gm, g, root.sample_names) for g in gates(gm))
        if mode == "topo" or relaxed_exactly:
            return adapter, root, root.sample_names, captured
    return None, model, (), _capture.capture(model, example_inputs, strict=strict, stacklevel=4, sparse=run_sparsely)


def canonicalize(gm: fx.GraphModule, root: nn.Module, example_inputs: Sequence[Any], live: Sequence[str] = ()) -> list:
    """Rewrite the weighted joins of a captured graph that are written other than as ``+`` chains into
    ``+`` chains (``passes.canonical_joins``; exact), before anything reads its topology: the self-check's
    vertex, the report's edges and ``derive`` see them as the mixed edges they are.  The graph is then
    verified against the eager model as a capture is (:func:`topofx.capture.verify_capture`), or the
    rewrite undone."""
    from topofx.passes import canonical_joins

    def verified(g: fx.GraphModule) -> str | None:
        try:
            _capture.verify_capture(root, g, tuple(example_inputs), live_attrs=live)
        except _capture.CaptureError as exc:
            return str(exc)
        return None

    return run_to_fixpoint(gm, root, (canonical_joins,), tuple(example_inputs), check=verified)


def _rewrite(gm: fx.GraphModule, root: nn.Module, passes: tuple, lowering: tuple, example_inputs: tuple,
             check: Callable[[fx.GraphModule], str | None] | None = None,
             owners: dict[str, set[str]] | None = None) -> list:
    """The rewrites to their fixpoint, then the lowering passes (each with the driver's invariants);
    ``owners``: the mixed edges of each node, to attribute rewrites to edges (``Topology.owners``)."""
    runs = run_to_fixpoint(gm, root, passes, example_inputs, check=check, owners=owners)
    if lowering:
        runs += run_to_fixpoint(gm, root, lowering, example_inputs, check=check, owners=owners)
    return runs


def _check_inputs(runs: list, example_inputs: tuple) -> tuple:
    """The example inputs as the graph expects them (channels-last where the layout pass rewrote)."""
    if any(run.name == "channels_last" and run.rewrites for run in runs):
        return tuple(map(to_channels_last, example_inputs))
    return example_inputs


def _warn_rejected(name: str, runs: list) -> None:
    for run in runs:
        for why in run.rejected:
            warnings.warn(
                f"topofx: pass {run.name} was not applied to {name}: {why}; the graph before it is kept "
                "(the result is correct, only less simplified; please report this with the model)",
                stacklevel=3,
            )


def _refuse(model: nn.Module, root: nn.Module, example_inputs: tuple, check_inputs: tuple, mode: str, passes: tuple,
            lowering: tuple, live: Sequence[str], problem: str, strict: bool, served: bool | None = None) -> None:
    """The self-check failed: find the pass that introduced the difference (simplify again from a
    fresh capture, checking after every pass) and warn, or raise under ``strict``."""
    try:
        gm = _capture.capture(root, example_inputs, strict=True, live_attrs=live).graph_module
    except _capture.CaptureError as exc:  # the model captures differently from call to call: no pass to blame
        where = f"a fresh capture to find the pass failed ({str(exc).splitlines()[0][:300]})"
    else:
        gm.meta[SERVED_TRAINING] = served
        canonicalize(gm, root, example_inputs, live)
        check = SelfCheck(model, gm, analyze(gm.graph, root), example_inputs, mode, live)
        runs = _rewrite(gm, root, passes, lowering, example_inputs,
                        check=lambda g: (f"self-check: {why}" if (why := check(g, check_inputs)) else None))
        culprits = [run.name for run in runs if any(why.startswith("self-check") for why in run.rejected)]
        where = f"pass {', '.join(culprits)} introduced the difference" if culprits else "no single pass reproduces it"
    message = (
        f"topofx: self-check failed: the simplified {type(model).__name__} differs from the original ({problem}); "
        f"{where}. Keeping the original's eager forward (no rewrite applied); please report this with the model"
    )
    if strict:
        raise SelfCheckError(message)
    warnings.warn(message, stacklevel=3)


def _branches_on_training(root: nn.Module, example_inputs: tuple, captured_code: tuple) -> bool:
    """Whether tracing in the other train/eval mode records different code (``if self.training:``)."""
    captured_mode = root.training
    try:
        root.train(not captured_mode)
        return not retraces_same(root, example_inputs, captured_code)
    finally:
        root.train(captured_mode)

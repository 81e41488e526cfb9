"""Side-by-side benchmark of a NAS supernet and its topofx-simplified versions.

This module carries topofx's performance figures; the test-suite never asserts a
time.  Two quantities are measured for every variant, in one process:

**Saved activations** (:func:`saved_activation_bytes`)
    The bytes of the *distinct storages* that autograd saves for backward during
    one training-mode forward pass.  Every tensor handed to the pack hook of
    :func:`torch.autograd.graph.saved_tensors_hooks` is mapped to its untyped
    storage; storages are de-duplicated by ``data_ptr`` and counted with their
    full ``nbytes`` (a view keeps its whole storage alive, so slicing a fused
    tensor is charged for the whole tensor).  Storages of the model's
    parameters and buffers, of its architecture parameters, of anything that is
    a leaf tensor requiring grad, and therefore of any *view* of these (same
    storage pointer) are excluded: they live regardless of autograd.  The pack
    hook returns the tensor itself so every counted storage stays alive until
    the measurement ends and no address can be recycled under the
    de-duplication.  Buffers (BatchNorm running statistics) are snapshotted and
    restored, the module's train/eval flags are restored, and the global RNG is
    forked and seeded so that stochastic supernets (GDAS, SNAS) are measured on
    a reproducible sample.  This is the quantity of the reference tables in
    METHOD.md ("bytes of distinct storages saved for backward").

**Step time** (:func:`step_time`, :func:`compare`)
    Wall-clock seconds (``time.perf_counter``) of one training step: zero the
    gradients, forward, loss, backward, optimizer step over the model's
    parameters plus its architecture parameters (``model.arch_parameters()``,
    which may return plain tensors with ``requires_grad=True``).  The loss is
    cross-entropy against fixed random labels on the *last* floating-point
    tensor of the output when it is 2-D (xautodl returns ``(features,
    logits)``), else that tensor's mean.  Every timed step starts from the same
    state: parameters, buffers and ``.grad`` are snapshotted before measuring,
    restored (outside the timed region) after each step, and restored once more
    at the end, so benchmarking never alters the model.  Python's garbage
    collector is paused inside the timed region and run between steps.  The
    figure reported is the median over ``steps`` timed steps after ``warmup``
    untimed ones.  :func:`compare` interleaves the variants round-robin (the
    order rotates every round) so that machine noise hits all of them alike.

Units: 1 MB in the tables is 1 MiB = 2**20 bytes.  ``speed-up`` is
``baseline_time / time`` (> 1 is faster than the baseline); ``memory ratio`` is
``act_bytes / baseline_act_bytes`` (< 1 saves memory).

Command line::

    python -m topofx.bench NAME [--modes exact,topo] [--batch-size 64]
                                [--image-size 32] [--steps 5] [--warmup 1]
                                [--channels-last] [--threads N] [--no-progress]
    python -m topofx.bench --list
    python -m topofx.bench [NAME] --overhead [--calls 200]

**Per-call overhead** (:func:`overhead`, ``--overhead``)
    What a call of the simplified module costs beyond its graph run (binding the call, the guards,
    ...): each call is timed whole and its graph run inside it too, and the median of the
    differences is reported in microseconds (tiny input, train mode, ``no_grad``) -- for calls with
    nothing changed in between, and for calls after an in-place change of the architecture weights;
    and the same calls back to back with the graph run left out (caches warm).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MB",
    "Row",
    "saved_activation_bytes",
    "step_time",
    "compare",
    "format_table",
    "run",
    "ChannelsLastInput",
    "OverheadRow",
    "overhead",
    "format_overhead",
    "main",
]

#: Bytes per "MB" in the tables (MiB).
MB: int = 2**20

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def default_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Plain SGD with momentum (the weight optimizer of DARTS-style search)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


# --------------------------------------------------------------------------- helpers


def _call(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a tensor, a tuple/list of positional
    arguments, or a mapping of keyword arguments."""
    return _caller(model, inputs)()


def _caller(model: nn.Module, inputs: Any) -> Callable[[], Any]:
    """:func:`_call` of ``model`` on ``inputs`` as a function of no arguments, the form of the call decided
    now: a timed call then times the model, not ``isinstance(inputs, typing.Mapping)`` (a few
    microseconds through ``typing`` and ``abc``: :func:`overhead` counted them as the model's)."""
    if isinstance(inputs, Mapping):
        return functools.partial(model, **inputs)
    if isinstance(inputs, (tuple, list)):
        return functools.partial(model, *inputs)
    return functools.partial(model, inputs)


def _arch_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Architecture parameters of ``model`` that require grad.

    ``model.arch_parameters()`` (DARTS code, plain tensors) when it is a
    method, ``model.arch_parameters`` when it is a tensor (xautodl registers an
    ``nn.Parameter`` under that name), and ``model.get_alphas()`` (xautodl).
    """
    found: list[torch.Tensor] = []
    attr = getattr(model, "arch_parameters", None)
    if isinstance(attr, torch.Tensor):
        found.append(attr)
    elif callable(attr):
        try:
            found.extend(attr())
        except (TypeError, NotImplementedError, AttributeError):
            pass
    get_alphas = getattr(model, "get_alphas", None)
    if callable(get_alphas) and not isinstance(get_alphas, torch.Tensor):
        try:
            found.extend(get_alphas())
        except (TypeError, NotImplementedError, AttributeError):
            pass
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for t in found:
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    """Model parameters plus architecture parameters, de-duplicated, requiring grad."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for t in list(model.parameters()) + _arch_parameters(model):
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor whose value a training step may change: parameters, arch
    parameters, buffers (de-duplicated by identity)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for t in list(model.parameters()) + _arch_parameters(model) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _storage_key(t: torch.Tensor) -> int | None:
    """Identity of ``t``'s storage (views share it; also for fake tensors, which have no address)."""
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensor subclasses / opaque tensors without a storage
        return None


class _Snapshot:
    """Copies of parameter/buffer values, ``.grad`` and train flags, restorable in place.

    Restoring writes into the existing tensors (``copy_``) so that modules which
    share Parameter objects or hold views of them stay consistent.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors = _state_tensors(model)
        with torch.no_grad():
            self.values = [t.detach().clone() for t in self.tensors]
        self.grads = [t.grad for t in self.tensors]
        self.training = [(m, m.training) for m in model.modules()]

    def restore_values(self) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors, self.values):
                t.copy_(v)

    def restore(self) -> None:
        self.restore_values()
        for t, g in zip(self.tensors, self.grads):
            t.grad = g
        for m, flag in self.training:
            m.training = flag


def _floating_leaves(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _floating_leaves(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _floating_leaves(v)


def _logits(output: Any) -> torch.Tensor:
    """The last floating-point tensor of ``output`` (the logits for xautodl's
    ``(features, logits)``)."""
    tensors = list(_floating_leaves(output))
    if not tensors:
        raise TypeError("model output contains no floating-point tensor")
    return tensors[-1]


def _labels_for(logits: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g)
    return labels.to(logits.device)


def default_loss(output: Any) -> torch.Tensor:
    """Cross-entropy vs fixed random labels when the logits are 2-D, else their mean."""
    logits = _logits(output)
    if logits.dim() == 2:
        return F.cross_entropy(logits, _labels_for(logits))
    return logits.mean()


@contextlib.contextmanager
def _seeded_rng(seed: int = 0) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- memory


def saved_activation_bytes(
    model: nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """Bytes of distinct storages saved for backward by one train-mode forward.

    ``loss_fn``, when given, is applied to the output inside the measurement (so
    what the loss saves counts too).  Parameters, buffers, architecture
    parameters, leaf tensors requiring grad and views of any of them are not
    counted.  The model's buffers and train/eval flags are restored afterwards;
    the global RNG state is left untouched.
    """
    snap = _Snapshot(model)
    excluded = {key for t in snap.tensors if (key := _storage_key(t)) is not None}
    try:
        model.train()
        with _seeded_rng(0), torch.enable_grad():
            with counting_saved_bytes(excluded) as counted:
                out = _call(model, inputs)
                if loss_fn is not None:
                    out = loss_fn(out)
            del out
    finally:
        snap.restore()
        gc.collect()
    return counted.total


class _SavedBytes:
    total = 0


@contextlib.contextmanager
def counting_saved_bytes(excluded: set[int] = frozenset()) -> Iterator[_SavedBytes]:
    """Count, while active, the bytes of distinct storages autograd saves for backward (``.total``,
    set on exit).  Parameters, leaf tensors requiring grad and storages in ``excluded`` are not
    counted; a saved tensor keeps its storage alive, so no key is recycled."""
    saved: dict[int, int] = {}
    keyless: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad):
            return t
        key = _storage_key(t)
        if key is None:  # no storage to key on: charge the tensor itself
            keyless[id(t)] = t.numel() * t.element_size()
        elif key not in excluded:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    counted = _SavedBytes()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counted
    finally:
        counted.total = int(sum(saved.values()) + sum(keyless.values()))


# --------------------------------------------------------------------------- time


class _Stopwatch:
    """Seconds of the work inside ``with``: CUDA events on a GPU (the work is asynchronous there;
    ``end.synchronize()`` waits for it), ``perf_counter`` on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.seconds = cuda, float("nan")

    def __enter__(self) -> "_Stopwatch":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


class _Trainer:
    """Times single training steps of one model, each from the same snapshot."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        optimizer_factory: OptimizerFactory = default_optimizer,
        loss_fn: Callable[[Any], torch.Tensor] = default_loss,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.loss_fn = loss_fn
        self.snapshot = _Snapshot(model)
        self.params = _trainable(model)
        self.optimizer = optimizer_factory(self.params)
        self.times: list[float] = []
        self.cuda = any(t.is_cuda for t in _floating_leaves(inputs))

    def step(self, record: bool = True) -> float:
        model, opt = self.model, self.optimizer
        model.train()
        gc.collect()
        with _gc_paused(), torch.enable_grad(), _Stopwatch(self.cuda) as watch:
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(_call(model, self.inputs))
            loss.backward()
            opt.step()
        dt = watch.seconds
        del loss
        self.snapshot.restore_values()  # next step starts from the same state
        if record:
            self.times.append(dt)
        return dt

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.snapshot.restore()

    def median(self) -> float:
        return float(statistics.median(self.times)) if self.times else float("nan")


def step_time(
    model: nn.Module,
    inputs: Any,
    *,
    steps: int = 5,
    warmup: int = 1,
    optimizer_factory: OptimizerFactory = default_optimizer,
) -> float:
    """Median seconds of one training step (forward + loss + backward + optimizer
    step over parameters and architecture parameters).

    The model's parameters, buffers, gradients and train/eval flags are the same
    after the call as before it.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    trainer = _Trainer(model, inputs, optimizer_factory)
    try:
        for _ in range(warmup):
            trainer.step(record=False)
        for _ in range(steps):
            trainer.step()
    finally:
        trainer.close()
    return trainer.median()


# --------------------------------------------------------------------------- compare


@dataclass
class Row:
    """One variant of a comparison.

    ``time_ratio`` is the speed-up vs the baseline, ``baseline_time / step_time_s``
    (> 1 means faster); ``mem_ratio`` is ``act_bytes / baseline_act_bytes``.
    """

    name: str
    step_time_s: float
    act_bytes: int
    time_ratio: float
    mem_ratio: float

    @property
    def speedup(self) -> float:
        return self.time_ratio

    @property
    def act_mb(self) -> float:
        return self.act_bytes / MB


def compare(
    named_models: dict[str, nn.Module],
    inputs: Any,
    *,
    steps: int = 5,
    warmup: int = 1,
    baseline: str | None = None,
    optimizer_factory: OptimizerFactory = default_optimizer,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every model on the same ``inputs`` in one process.

    Saved activations are measured first, one model at a time; then ``warmup``
    untimed and ``steps`` timed rounds run round-robin over the models (order
    rotated each round).  ``baseline`` (default: the first name) is the row the
    ratios refer to.  ``progress``, when given, is called once per unit of work
    (``len(models) * (1 + warmup + steps)`` calls) with a short description.
    All models are snapshotted before any step, and restored afterwards in
    reverse order, so models sharing Parameter objects end unchanged.
    """
    if not named_models:
        raise ValueError("compare() needs at least one model")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    names = list(named_models)
    if baseline is None:
        baseline = names[0]
    if baseline not in named_models:
        raise KeyError(f"baseline {baseline!r} is not one of {names}")
    tick = progress or (lambda _msg: None)

    act: dict[str, int] = {}
    for name in names:
        act[name] = saved_activation_bytes(named_models[name], inputs)
        tick(f"{name}: activations")

    trainers = {n: _Trainer(named_models[n], inputs, optimizer_factory) for n in names}
    try:
        for r in range(warmup + steps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                trainers[name].step(record=r >= warmup)
                tick(f"{name}: {'warmup' if r < warmup else 'step'}")
    finally:
        for name in reversed(names):
            trainers[name].close()

    t_base = trainers[baseline].median()
    a_base = act[baseline]
    rows = []
    for name in names:
        t = trainers[name].median()
        rows.append(
            Row(
                name=name,
                step_time_s=t,
                act_bytes=act[name],
                time_ratio=t_base / t if t > 0 else float("nan"),
                mem_ratio=act[name] / a_base if a_base > 0 else float("nan"),
            )
        )
    return rows


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """Plain fixed-width text table (1 MB = 2**20 bytes)."""
    headers = ("variant", "step time (ms)", "speed-up (x)", "saved act. (MB)", "memory ratio")
    body = [
        (
            r.name,
            f"{r.step_time_s * 1e3:.1f}",
            f"{r.time_ratio:.2f}",
            f"{r.act_bytes / MB:.1f}",
            f"{r.mem_ratio:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Iterable[str]) -> str:
        cells = list(cells)
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(b) for b in body)
    out.append("(MB = 2**20 bytes; speed-up = baseline time / time; memory ratio = act / baseline act)")
    return "\n".join(out)


# --------------------------------------------------------------------------- run / CLI


def _zoo() -> types.ModuleType:
    return importlib.import_module("topofx.zoo")


def _simplify_fn() -> Callable[..., nn.Module]:
    """``topofx.simplify`` (the function, whether exported by the package or
    only defined in the ``topofx.simplify`` module)."""
    import topofx

    fn = getattr(topofx, "simplify", None)
    if fn is None or isinstance(fn, types.ModuleType):
        fn = getattr(importlib.import_module("topofx.simplify"), "simplify")
    return fn


def _child_floor(zoo: types.ModuleType, name: str, batch_size: int, image_size: int) -> nn.Module | None:
    build_child = getattr(zoo, "build_child", None)
    if not callable(build_child):
        return None
    try:
        got = build_child(name, batch_size=batch_size, image_size=image_size)
    except (KeyError, ValueError, NotImplementedError, TypeError):
        return None
    if isinstance(got, (tuple, list)) and got and isinstance(got[0], nn.Module):
        got = got[0]
    return got if isinstance(got, nn.Module) else None


class ChannelsLastInput(nn.Module):
    """``model`` fed its 4-D CPU inputs in channels-last layout: the fair comparison for
    ``simplify(..., layout="channels_last")``, which changes the layout and nothing else about the
    arithmetic (PyTorch keeps the layout through convolutions, BN, pooling and elementwise ops)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> Any:
        from topofx.modules import to_channels_last

        return self.model(*map(to_channels_last, inputs))

    def arch_parameters(self) -> list[torch.Tensor]:
        return _arch_parameters(self.model)


CL = ", channels-last"  # row-name suffix of the channels-last variants


def run(
    name: str,
    *,
    modes: Sequence[str] = ("exact", "topo"),
    batch_size: int = 64,
    image_size: int = 32,
    steps: int = 5,
    warmup: int = 1,
    child_floor: bool = True,
    channels_last: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> str:
    """Benchmark zoo model ``name``: the original, ``simplify(..., mode=m)`` for each
    mode, and (when the zoo provides one via ``build_child``) a child network as
    the floor.  Returns the report text: note lines for skipped modes, the table,
    and ratio lines (``exact/original activation memory: 0.62``,
    ``exact speed-up: 1.41x``).  ``overrides`` are passed to ``topofx.zoo.build``
    (e.g. ``{"N": 1}`` for a smaller xautodl supernet); the child floor is only
    built without overrides.  ``channels_last`` adds, for every row, the same
    model in channels-last layout (``simplify(..., layout="channels_last")``;
    the original and the floor fed channels-last input), all against the same
    baseline (the original as built), so layout and topology gains read apart.
    """
    zoo = _zoo()
    notes: list[str] = []
    n_variants_max = (1 + len(modes) + (1 if child_floor else 0)) * (2 if channels_last else 1)
    total = 1 + len(modes) * (2 if channels_last else 1) + (1 if child_floor else 0) + n_variants_max * (1 + warmup + steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"bench {name}", file=sys.stderr, leave=False)

    def tick(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg, refresh=False)
            bar.update(1)

    try:
        model, example_inputs = zoo.build(
            name, batch_size=batch_size, image_size=image_size, **dict(overrides or {})
        )
        tick("built")
        models: dict[str, nn.Module] = {"original": model}
        if channels_last:
            models["original" + CL] = ChannelsLastInput(model)
        simplify = None
        try:
            simplify = _simplify_fn()
        except (ImportError, AttributeError) as exc:
            notes.append(f"note: topofx.simplify unavailable ({exc}); modes skipped")
        layouts = ("keep", "channels_last") if channels_last else ("keep",)
        for mode in modes:
            for layout in layouts:
                row = mode + (CL if layout == "channels_last" else "")
                if simplify is not None:
                    try:
                        models[row] = simplify(model, example_inputs, mode=mode, layout=layout)
                    except (NotImplementedError, ValueError) as exc:
                        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        notes.append(f"note: mode {row!r} skipped: {type(exc).__name__}: {msg}")
                tick(f"simplify {row}")
        if child_floor and not overrides:
            child = _child_floor(zoo, name, batch_size, image_size)
            if child is not None:
                models["child (floor)"] = child
                if channels_last:
                    models["child (floor)" + CL] = ChannelsLastInput(child)
            tick("child")
        if bar is not None:  # shrink the bar to the variants actually measured
            bar.total = bar.n + len(models) * (1 + warmup + steps)
            bar.refresh()
        rows = compare(
            models, example_inputs, steps=steps, warmup=warmup, baseline="original", progress=tick
        )
    finally:
        if bar is not None:
            bar.close()

    title = (
        f"{name}: batch {batch_size}, {image_size}x{image_size}, "
        f"median of {steps} steps after {warmup} warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    lines = list(notes)
    lines.append(format_table(rows, title))
    for row in rows:
        if row.name == "original":
            continue
        lines.append(f"{row.name}/original activation memory: {row.mem_ratio:.2f}")
        lines.append(f"{row.name} speed-up: {row.time_ratio:.2f}x")
    by_name = {row.name: row for row in rows}
    for mode in modes:
        for suffix in ("", CL):
            row, floor = by_name.get(mode + suffix), by_name.get("child (floor)" + suffix)
            if row and floor:
                lines.append(f"{row.name}/floor{suffix}: step time {row.step_time_s / floor.step_time_s:.2f}x, "
                             f"activation memory {row.act_bytes / floor.act_bytes:.2f}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------- per-call overhead

#: Input sizes tried, smallest first, by :func:`overhead`: the first the original runs at and
#: ``simplify`` graphs (a tiny feature map can fail the self-check's tolerance) is measured.
OVERHEAD_SIZES: tuple[int, ...] = (8, 16, 32)


@dataclass
class OverheadRow:
    """One model's per-call overhead (see :func:`overhead`); ``nan`` where there is no graph."""

    name: str
    image_size: int | None
    overhead_us: float  # median over calls of (call time - time in the graph run), nothing changed between calls
    arch_step_us: float  # the same, the architecture weights changed in place before every call (a search)
    graph_ms: float  # median time in the graph run
    calls: int
    note: str = ""
    warm_us: float = float("nan")  # median call time with the graph run left out (its output returned): caches warm


def _smallest_simplified(zoo: types.ModuleType, name: str, batch_size: int, mode: str,
                         sizes: Sequence[int], overrides: Mapping[str, Any]) -> tuple[Any, Any, int | None, str]:
    """``(simplified, inputs, size, note)`` at the smallest of ``sizes`` the original accepts and
    ``simplify`` graphs; at the largest one the original accepts when none is graphed (with the
    fallback reason as ``note``)."""
    import warnings

    simplify, last = _simplify_fn(), (None, None, None, "the original runs at none of the sizes tried")
    for size in sizes:
        model, inputs = zoo.build(name, batch_size=batch_size, image_size=size, **dict(overrides))
        try:
            with torch.no_grad():
                _call(model, inputs)
        except Exception:  # noqa: BLE001 - too small for this model: try the next size
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified = simplify(model, inputs, mode=mode)
        if getattr(simplified, "graph_module", None) is not None:
            return simplified, inputs, size, ""
        last = (simplified, inputs, size, f"no graph: {simplified.report.fallback}")
    return last


def overhead(
    name: str,
    *,
    calls: int = 200,
    warmup: int = 20,
    batch_size: int = 2,
    sizes: Sequence[int] = OVERHEAD_SIZES,
    mode: str = "topo",
    overrides: Mapping[str, Any] | None = None,
) -> OverheadRow:
    """What a call of ``simplify(model)`` costs over running its graph: binding the call, the guards
    (``topofx.capture.guards``), the speculation RNG fork -- everything but the graph run
    (``SimplifiedModule._run_graph``: the graph module's call; with an adapter, its sampling step, the
    original's own draws, around the sparse executor's run).

    Each call is timed whole, and the graph run inside it is timed too; the figure is the median over
    ``calls`` calls (after ``warmup``) of their difference, so the graph's own noise cancels call by call.
    Measured twice: calls in a row with nothing changed in between, and calls each preceded (untimed)
    by an in-place change of every architecture weight (``+-1e-4``, as a search step does), which the
    guards must evaluate anew.  A graph run leaves little of what the checks read in the CPU's caches:
    a third figure, ``warm_us``, times calls whose graph run is left out (its last output returned),
    back to back -- the checks' own work.  Train mode, under ``no_grad``, garbage collector paused;
    ``batch_size`` and the smallest of ``sizes`` that the model takes and ``simplify`` graphs."""
    import warnings

    zoo = _zoo()
    simplified, inputs, size, note = _smallest_simplified(zoo, name, batch_size, mode, sizes, dict(overrides or {}))
    if simplified is None or getattr(simplified, "graph_module", None) is None:
        return OverheadRow(name, size, float("nan"), float("nan"), float("nan"), 0, note)
    inside: list[float] = []
    run_graph = simplified._run_graph

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run_graph(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - start)

    alphas = _arch_parameters(simplified.original)
    notes, figures = [note] if note else [], []
    simplified.__dict__["_run_graph"] = timed  # an instance attribute: forward's calls of the method find it
    try:
        with warnings.catch_warnings(), torch.no_grad(), _gc_paused():
            warnings.simplefilter("ignore")
            simplified.train()
            call = _caller(simplified, inputs)
            for step in (False, True):
                overheads, graph_times, skipped, recaptures = [], [], 0, 0
                for i in range(warmup + calls):
                    if step:
                        for alpha in alphas:
                            alpha.add_(1e-4 if i % 2 else -1e-4)
                    graph = simplified.graph_module
                    inside.clear()
                    start = time.perf_counter()
                    call()
                    total = time.perf_counter() - start
                    if i < warmup:
                        continue
                    recaptures += simplified.graph_module is not graph
                    skipped += not inside
                    overheads.append(total - sum(inside))
                    graph_times.append(sum(inside))
                figures.append((statistics.median(overheads) * 1e6, statistics.median(graph_times) * 1e3))
                what = "arch-step calls" if step else "calls"
                if skipped:
                    notes.append(f"{skipped} of {calls} {what} ran eagerly")
                if recaptures:
                    notes.append(f"{recaptures} of {calls} {what} captured the model again")
                if step and not alphas:
                    notes.append("no architecture weights found to change")
            output = _call(simplified, inputs)
            simplified.__dict__["_run_graph"] = lambda *args, **kwargs: output
            warm = []
            for i in range(warmup + calls):
                start = time.perf_counter()
                call()
                warm.append(time.perf_counter() - start)
    finally:
        simplified.__dict__.pop("_run_graph", None)
    return OverheadRow(name, size, figures[0][0], figures[1][0], figures[0][1], calls, "; ".join(notes),
                       statistics.median(warm[warmup:]) * 1e6)


def format_overhead(rows: Sequence[OverheadRow], title: str = "") -> str:
    """The rows of :func:`overhead` as a table."""
    lines = [title] if title else []
    lines.append(f"{'model':<20}  {'input':>5}  {'overhead us':>11}  {'arch step us':>12}  {'warm us':>7}  "
                 f"{'graph ms':>8}  note")
    lines.append(f"{'-' * 20}  {'-' * 5}  {'-' * 11}  {'-' * 12}  {'-' * 7}  {'-' * 8}  ----")
    for r in rows:
        lines.append(f"{r.name:<20}  {r.image_size or '-':>5}  {r.overhead_us:>11.0f}  {r.arch_step_us:>12.0f}  "
                     f"{r.warm_us:>7.0f}  {r.graph_ms:>8.2f}  {r.note}".rstrip())
    return "\n".join(lines)


def _parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in ("exact", "topo")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(bad)}; choose from exact, topo")
    return modes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def main(argv: Sequence[str] | None = None, prog: str = "python -m topofx.bench") -> int:
    """Command-line entry point; returns the exit code (2 for a usage error)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark a zoo supernet against its topofx-simplified versions "
        "(step time and saved activation memory).",
    )
    parser.add_argument("name", nargs="?", help="zoo model name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the zoo's model names and exit")
    parser.add_argument("--modes", type=_parse_modes, default=("exact", "topo"),
                        help="comma-separated simplify modes (default: exact,topo)")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--image-size", type=_positive, default=32)
    parser.add_argument("--steps", type=_positive, default=5)
    parser.add_argument("--warmup", type=_non_negative, default=1)
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch intra-op threads (default: torch's choice); on a shared "
                        "machine fewer threads than busy cores avoids OpenMP stalls")
    parser.add_argument("--channels-last", action="store_true",
                        help="also measure every variant in channels-last layout (simplify's "
                        "layout='channels_last'; the original and the floor fed channels-last input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: the simplified module's per-call overhead over running its graph (median "
                        "microseconds of binding the call, the guards and the rest; topo mode, train mode, no_grad, "
                        "batch 2, the smallest input size the model takes); every zoo model when NAME is left out")
    parser.add_argument("--calls", type=_positive, default=200,
                        help="--overhead: calls timed per model and figure (default 200)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return, not exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    try:
        zoo = _zoo()
        names = list(zoo.names())
    except Exception as exc:  # noqa: BLE001 - report, don't trace back
        print(f"topofx.bench: error: cannot load the model zoo: {exc}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(names))
        return 0
    if args.name is None and not args.overhead:
        print("topofx.bench: error: give a model name (or --list)", file=sys.stderr)
        return 2
    if args.name is not None and args.name not in names:
        print(
            f"topofx.bench: error: unknown model {args.name!r}; known: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.overhead:
        print(f"per-call overhead of simplify(model) over its graph run (median us of call time minus graph time; "
              f"arch step: every architecture weight changed in place before each call; warm: calls back to back "
              f"with the graph run left out): topo mode, train mode, no_grad, batch 2, {args.calls} calls each, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        rows = []
        for name in [args.name] if args.name else names:
            row = overhead(name, calls=args.calls)
            rows.append(row)
            if not args.no_progress:
                print(f"  {name}: {row.overhead_us:.0f} us, arch step {row.arch_step_us:.0f} us", file=sys.stderr,
                      flush=True)
        print(format_overhead(rows))
        return 0
    text = run(
        args.name,
        modes=args.modes,
        batch_size=args.batch_size,
        image_size=args.image_size,
        steps=args.steps,
        warmup=args.warmup,
        channels_last=args.channels_last,
        progress=not args.no_progress,
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Equivalence checks between a supernet and a rewritten ("candidate") version of it.

Why: topofx promises that exact rewrites reproduce a training step of the original model —
outputs, gradients of every weight *and* of every architecture parameter, and BatchNorm
running-statistic updates — and that the rewritten module keeps following the architecture
parameters (they must stay live, never be frozen as constants). These helpers check exactly that,
for the test-suite and for users who want to verify a rewrite of their own model.

Typical use::

    from topofx.testing import assert_train_step_equivalent
    assert_train_step_equivalent(model, simplified, inputs)

Design notes:

* The candidate may *share* tensors with the original (a rewritten module that reuses the
  original's ``Parameter`` and buffer objects) or own copies (e.g. a ``deepcopy``). Both are
  handled: each model's state (values, ``.grad``s, module train flags) is snapshotted before and
  restored after every run, so neither run can see the other's side effects, and the RNG is
  re-seeded identically before each forward (needed for Gumbel sampling, dropout, ...).
* Architecture parameters may be ``nn.Parameter``s or plain ``requires_grad`` tensors kept as
  attributes (original DARTS). They are found through ``model.arch_parameters()`` (a method),
  ``model.arch_parameters`` (a tensor attribute, xautodl NAS-Bench-201 models),
  ``model.get_alphas()`` (xautodl), or passed explicitly.
* The counterpart of an original tensor in the candidate is: the very same object when the
  candidate holds it, else the candidate's tensor with the same qualified name, else the
  original object itself (assumed to be shared implicitly, e.g. through a reference the candidate
  keeps to the original module). A missing gradient counts as zeros.
* The loss is ``sum_leaf (leaf * R_leaf).sum()`` over every floating tensor leaf of the output
  (tuples, lists, dicts, namedtuples), with fixed random ``R``; so every output element matters.
* Per tensor, relative error is ``max|a-b| / max(max|b|, tiny)`` with ``b`` the original; a tensor
  passes when ``max|a-b| <= atol + rtol * max|b|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .ir import host_rng_state, preserved_state, restore_value, run_seeded, seed_all, set_host_rng_state

__all__ = [
    "StateSnapshot",
    "snapshot_state",
    "restore_state",
    "find_arch_parameters",
    "flatten_tensors",
    "EquivalenceReport",
    "train_step_equivalence",
    "assert_train_step_equivalent",
    "eval_equivalence",
    "assert_eval_equivalent",
    "assert_follows_alpha",
    "set_one_hot",
    "seeded_outputs",
]

_TINY = 1e-30
CATEGORIES = ("output", "weight_grad", "arch_grad", "buffer")


# ---------------------------------------------------------------------------------------------
# state snapshots
# ---------------------------------------------------------------------------------------------
@dataclass
class StateSnapshot:
    """Cloned values and grads of a model's tensors, module train flags and the RNG state."""

    tensors: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]
    training: List[Tuple[nn.Module, bool]]
    rng_state: torch.Tensor
    cuda_rng_state: Optional[List[torch.Tensor]] = None
    host_rng_state: Optional[list] = None  # Python's random, NumPy's and the model's (topofx.ir.host_rng_state)


def find_arch_parameters(model: nn.Module) -> List[torch.Tensor]:
    """Architecture parameters of ``model`` by the usual conventions, or ``[]`` if none found."""
    attr = getattr(model, "arch_parameters", None)
    if isinstance(attr, torch.Tensor):
        return [attr]
    if callable(attr):
        return [t for t in attr() if isinstance(t, torch.Tensor)]
    get_alphas = getattr(model, "get_alphas", None)
    if callable(get_alphas):
        return [t for t in get_alphas() if isinstance(t, torch.Tensor)]
    return []


def set_one_hot(alphas: Sequence[torch.Tensor], choose: Callable[[int, int], int],
                segments: Optional[List[int]] = None) -> None:
    """Set architecture parameters to ``1e4 * one-hot`` rows, in place: their softmax (and a Gumbel
    softmax at any usual temperature) is then exactly one-hot in float32, the setting in which
    TopoNAS mode must reproduce the original forward (vertex-exactness).

    ``choose(row, n)`` picks the candidate of each row of ``n`` candidates; ``segments`` lists the
    row lengths when one flat tensor holds all edges."""
    with torch.no_grad():
        if segments is not None:  # one flat tensor sliced per edge (random supernets' "flat" layout)
            (a,) = alphas
            a.zero_()
            start = 0
            for r, k in enumerate(segments):
                a[start + choose(r, k)] = 1e4
                start += k
            return
        for a in alphas:
            rows = a.reshape(-1, a.shape[-1])
            idx = torch.tensor([choose(r, a.shape[-1]) for r in range(rows.shape[0])])
            a.copy_((1e4 * torch.nn.functional.one_hot(idx, a.shape[-1]).float()).reshape(a.shape))


def seeded_outputs(original: nn.Module, candidate: nn.Module, *inputs: Any, seed: int = 0) -> Tuple[Any, Any]:
    """``(candidate(*inputs), original(*inputs))``, each run from the same RNG seed (random draws in
    forward line up) with the original's parameters, buffers and the RNG state restored afterwards
    (a candidate that shares them sees the same state)."""
    with preserved_state(original):
        expected = run_seeded(original, inputs, seed)
    with preserved_state(original):
        got = run_seeded(candidate, inputs, seed)
    return got, expected

def _unique(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _state_tensors(model: nn.Module, extra: Iterable[torch.Tensor] = ()) -> List[torch.Tensor]:
    return _unique([*model.parameters(), *model.buffers(), *extra])


def snapshot_state(model: nn.Module, extra_tensors: Optional[Iterable[torch.Tensor]] = None
                   ) -> StateSnapshot:
    """Clone parameters, buffers, their ``.grad``s and train flags of ``model``, plus RNG state.

    Architecture parameters returned by :func:`find_arch_parameters` are included (they may be
    plain tensors outside ``parameters()``), as are ``extra_tensors``.
    """
    extra = list(find_arch_parameters(model)) + list(extra_tensors or [])
    tensors = []
    with torch.no_grad():
        for t in _state_tensors(model, extra):
            g = t.grad.detach().clone() if t.grad is not None else None
            tensors.append((t, t.detach().clone(), g))
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return StateSnapshot(tensors=tensors,
                         training=[(m, m.training) for m in model.modules()],
                         rng_state=torch.get_rng_state(), cuda_rng_state=cuda, host_rng_state=host_rng_state(model))


def restore_state(model: nn.Module, snap: StateSnapshot) -> None:
    """Put back everything :func:`snapshot_state` saved (values in place, grads, flags, RNG).  A tensor
    whose value did not change is not written (:func:`topofx.ir.restore_value`)."""
    with torch.no_grad():
        for t, value, grad in snap.tensors:
            restore_value(t, value)
            t.grad = grad.clone() if grad is not None else None
    for m, flag in snap.training:
        m.training = flag
    torch.set_rng_state(snap.rng_state)
    if snap.cuda_rng_state is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng_state)
    if snap.host_rng_state is not None:
        set_host_rng_state(snap.host_rng_state)


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def flatten_tensors(obj: Any, prefix: str = "out") -> List[Tuple[str, torch.Tensor]]:
    """Every floating-point tensor leaf of a (nested) output, with a path-like name."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [x for k in obj for x in flatten_tensors(obj[k], f"{prefix}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)
        if fields:
            return [x for f, v in zip(fields, obj) for x in flatten_tensors(v, f"{prefix}.{f}")]
        return [x for i, v in enumerate(obj) for x in flatten_tensors(v, f"{prefix}[{i}]")]
    return []


def _as_tuple(inputs: Any) -> Tuple[Any, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _clone_inputs(inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------
@dataclass
class TensorComparison:
    category: str
    name: str
    abs_error: float
    ref_max: float
    rel_error: float
    ok: bool
    note: str = ""


def _compare(category: str, name: str, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
             rtol: float, atol: float, like: Optional[torch.Tensor] = None) -> TensorComparison:
    """Compare candidate ``a`` against reference ``b`` (``None`` = zeros shaped like ``like``)."""
    if a is None and b is None:
        return TensorComparison(category, name, 0.0, 0.0, 0.0, True)
    shape_src = b if b is not None else (a if a is not None else like)
    if a is None:
        a = torch.zeros_like(shape_src)
    if b is None:
        b = torch.zeros_like(shape_src)
    if a.shape != b.shape:
        return TensorComparison(category, name, math.inf, math.nan, math.inf, False,
                                f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if a.numel() == 0:
        return TensorComparison(category, name, 0.0, 0.0, 0.0, True)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return TensorComparison(category, name, math.inf, math.nan, math.inf, False,
                                "NaN pattern differs")
    same = (a == b) | nan_a  # also covers equal infinities
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    finite_b = b[torch.isfinite(b)]
    ref_max = float(finite_b.abs().max()) if finite_b.numel() else 0.0
    abs_err = float(diff.max())
    rel = abs_err / max(ref_max, _TINY)
    ok = abs_err <= atol + rtol * ref_max
    return TensorComparison(category, name, abs_err, ref_max, rel, ok)


@dataclass
class EquivalenceReport:
    """Result of an equivalence check.

    ``max_rel_error`` / ``max_abs_error`` map each category (``output``, ``weight_grad``,
    ``arch_grad``, ``buffer``) to the worst value over its tensors; ``failures`` lists the tensors
    outside tolerance, ``problems`` structural mismatches (output structure, missing tensors).
    """

    mode: str
    rtol: float
    atol: float
    comparisons: List[TensorComparison] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    def _worst(self, category: str, key: Callable[[TensorComparison], float]
               ) -> Optional[TensorComparison]:
        cs = [c for c in self.comparisons if c.category == category]
        return max(cs, key=key) if cs else None

    @property
    def max_rel_error(self) -> Dict[str, float]:
        out = {}
        for cat in CATEGORIES:
            w = self._worst(cat, lambda c: c.rel_error)
            if w is not None:
                out[cat] = w.rel_error
        return out

    @property
    def max_abs_error(self) -> Dict[str, float]:
        out = {}
        for cat in CATEGORIES:
            w = self._worst(cat, lambda c: c.abs_error)
            if w is not None:
                out[cat] = w.abs_error
        return out

    @property
    def failures(self) -> List[TensorComparison]:
        return [c for c in self.comparisons if not c.ok]

    def counts(self) -> Dict[str, int]:
        return {cat: sum(c.category == cat for c in self.comparisons) for cat in CATEGORIES}

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = [f"{self.mode} equivalence: {'OK' if self.ok else 'FAILED'} "
                 f"(rtol={self.rtol:g}, atol={self.atol:g})"]
        counts = self.counts()
        for cat in CATEGORIES:
            if not counts[cat]:
                continue
            w = self._worst(cat, lambda c: c.rel_error)
            nfail = sum(1 for c in self.failures if c.category == cat)
            lines.append(f"  {cat:<12} {counts[cat]:5d} tensors, max rel {w.rel_error:.3e} "
                         f"({w.name}), max abs {self.max_abs_error[cat]:.3e}, "
                         f"{nfail} outside tolerance")
        for p in self.problems:
            lines.append(f"  problem: {p}")
        fails = sorted(self.failures, key=lambda c: -c.rel_error)
        for c in fails[:20]:
            extra = f" [{c.note}]" if c.note else ""
            lines.append(f"  FAIL {c.category}:{c.name}: abs {c.abs_error:.3e}, ref max "
                         f"{c.ref_max:.3e}, rel {c.rel_error:.3e}{extra}")
        if len(fails) > 20:
            lines.append(f"  ... and {len(fails) - 20} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running one step
# ---------------------------------------------------------------------------------------------
def _loss_weights(leaves: List[Tuple[str, torch.Tensor]], seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            for _, t in leaves]


def _run(model: nn.Module, inputs: Tuple[Any, ...], seed: int, train: bool,
         backward: bool, loss_weights: Optional[List[torch.Tensor]], loss_seed: int):
    """One forward (and backward) pass; returns (output leaves, loss weights used)."""
    model.train(train)
    seed_all(seed, model)
    if backward:
        out = model(*_clone_inputs(inputs))
    else:
        with torch.no_grad():
            out = model(*_clone_inputs(inputs))
    leaves = flatten_tensors(out)
    if backward:
        if loss_weights is None or len(loss_weights) != len(leaves) or any(
                w.shape != t.shape for w, (_, t) in zip(loss_weights, leaves)):
            loss_weights = _loss_weights(leaves, loss_seed)
        loss = None
        for (_, t), w in zip(leaves, loss_weights):
            if t.requires_grad:
                term = (t * w).sum()
                loss = term if loss is None else loss + term
        if loss is not None:
            loss.backward()
    return [(n, t.detach().clone()) for n, t in leaves], loss_weights


class _Pairing:
    """Resolve the original's named tensors and their counterparts in the candidate."""

    def __init__(self, original: nn.Module, candidate: nn.Module,
                 arch_params: Optional[Sequence[torch.Tensor]],
                 candidate_arch_params: Optional[Sequence[torch.Tensor]]):
        self.arch_o = _unique(arch_params if arch_params is not None
                              else find_arch_parameters(original))
        if candidate_arch_params is not None:
            arch_c = _unique(candidate_arch_params)
        else:
            arch_c = _unique(find_arch_parameters(candidate))
        if len(arch_c) != len(self.arch_o) or any(
                c.shape != a.shape for c, a in zip(arch_c, self.arch_o)):
            # no usable list on the candidate: assume it shares the original's tensors
            arch_c = self.arch_o
        self.arch_c = arch_c
        arch_ids = {id(t) for t in self.arch_o}
        self.weights_o = [(n, p) for n, p in original.named_parameters() if id(p) not in arch_ids]
        self.buffers_o = list(original.named_buffers())
        self.cand_params = dict(candidate.named_parameters(remove_duplicate=False))
        self.cand_buffers = dict(candidate.named_buffers(remove_duplicate=False))
        self.cand_ids = {id(t) for t in [*self.cand_params.values(), *self.cand_buffers.values()]}
        self.arch_names = _arch_names(original, self.arch_o)

    def counterpart(self, name: str, t: torch.Tensor, kind: str) -> torch.Tensor:
        if id(t) in self.cand_ids:
            return t
        table = self.cand_params if kind == "param" else self.cand_buffers
        c = table.get(name)
        if c is not None and c.shape == t.shape:
            return c
        return t

    def arch_counterparts(self) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        names = self.arch_names
        return list(zip(names, self.arch_o, self.arch_c))

    def sync_candidate(self, original: nn.Module) -> None:
        """Copy the original's current values into candidate tensors that are not shared."""
        with torch.no_grad():
            for n, p in original.named_parameters():
                c = self.counterpart(n, p, "param")
                if c is not p:
                    c.copy_(p)
            for n, b in self.buffers_o:
                c = self.counterpart(n, b, "buffer")
                if c is not b:
                    c.copy_(b)
            for _, a, c in self.arch_counterparts():
                if c is not a and c.shape == a.shape:
                    c.copy_(a)


def _arch_names(model: nn.Module, arch: Sequence[torch.Tensor]) -> List[str]:
    """Qualified attribute names of the arch tensors (``arch[i]`` when not found)."""
    found: Dict[int, str] = {}
    for n, p in model.named_parameters():
        found.setdefault(id(p), n)
    for mname, m in model.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                found.setdefault(id(v), f"{mname}.{k}" if mname else k)
    names, used = [], set()
    for i, a in enumerate(arch):
        n = found.get(id(a), f"arch[{i}]")
        if n in used:
            n = f"{n}#{i}"
        used.add(n)
        names.append(n)
    return names


def _record_step(pairing: _Pairing, side: str):
    """Grads and buffers after a step, read from the original's tensors or their counterparts."""
    grads: Dict[str, Optional[torch.Tensor]] = {}
    arch: Dict[str, Optional[torch.Tensor]] = {}
    bufs: Dict[str, torch.Tensor] = {}
    for n, p in pairing.weights_o:
        t = p if side == "original" else pairing.counterpart(n, p, "param")
        grads[n] = t.grad.detach().clone() if t.grad is not None else None
    for n, a, c in pairing.arch_counterparts():
        t = a if side == "original" else c
        arch[n] = t.grad.detach().clone() if t.grad is not None else None
    for n, b in pairing.buffers_o:
        t = b if side == "original" else pairing.counterpart(n, b, "buffer")
        bufs[n] = t.detach().clone()
    return grads, arch, bufs


def _compare_outputs(report: EquivalenceReport, out_o, out_c, rtol, atol) -> None:
    names_o = [n for n, _ in out_o]
    names_c = [n for n, _ in out_c]
    if names_o != names_c:
        report.problems.append(f"output structure differs: original {names_o}, "
                               f"candidate {names_c}")
        return
    for (n, a), (_, b) in zip(out_c, out_o):
        report.comparisons.append(_compare("output", n, a, b, rtol, atol))


def train_step_equivalence(original: nn.Module, candidate: nn.Module, inputs: Any, *,
                           rtol: float = 1e-5, atol: float = 1e-6,
                           arch_params: Optional[Sequence[torch.Tensor]] = None,
                           candidate_arch_params: Optional[Sequence[torch.Tensor]] = None,
                           seed: int = 0, sync_state: bool = True, train: bool = True,
                           backward: bool = True) -> EquivalenceReport:
    """Compare one forward+backward of ``candidate`` against ``original`` (train mode unless ``train=False``;
    ``backward=False``: the forward only, outputs and buffers).

    Compares outputs, gradients of every weight of ``original`` (by name) and of every
    architecture parameter, and every buffer after the step (BatchNorm running statistics).
    Both models are left exactly as they were (values, grads, train flags, RNG state).
    With ``sync_state`` the candidate's non-shared counterparts start from the original's values.
    """
    inputs = _as_tuple(inputs)
    pairing = _Pairing(original, candidate, arch_params, candidate_arch_params)
    snap_o = snapshot_state(original, extra_tensors=pairing.arch_o)
    snap_c = snapshot_state(candidate, extra_tensors=pairing.arch_c)
    everything = _state_tensors(original, pairing.arch_o) + _state_tensors(candidate,
                                                                           pairing.arch_c)
    report = EquivalenceReport(mode="train-step", rtol=rtol, atol=atol)
    try:
        _clear_grads(everything)
        out_o, lw = _run(original, inputs, seed, train, backward, None, seed + 1)
        grads_o, arch_o, bufs_o = _record_step(pairing, "original")
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)

        if sync_state:
            pairing.sync_candidate(original)
        _clear_grads(everything)
        out_c, _ = _run(candidate, inputs, seed, train, backward, lw, seed + 1)
        grads_c, arch_c, bufs_c = _record_step(pairing, "candidate")
    finally:
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)

    _compare_outputs(report, out_o, out_c, rtol, atol)
    params_o = dict(pairing.weights_o)
    # Some gradients are analytically zero (a conv bias feeding a train-mode BatchNorm) and hold
    # only float noise; compare weight gradients at the scale of the model's largest gradient.
    grad_scale = max((g.abs().max().item() for g in grads_o.values() if g is not None and g.numel()), default=0.0)
    grad_atol = max(atol, rtol * grad_scale)
    for n in grads_o:
        report.comparisons.append(_compare("weight_grad", n, grads_c[n], grads_o[n], rtol, grad_atol,
                                           like=params_o[n]))
    arch_like = {n: a for n, a, _ in pairing.arch_counterparts()}
    for n in arch_o:
        report.comparisons.append(_compare("arch_grad", n, arch_c[n], arch_o[n], rtol, atol,
                                           like=arch_like[n]))
    for n in bufs_o:
        report.comparisons.append(_compare("buffer", n, bufs_c[n], bufs_o[n], rtol, atol))
    return report


def assert_train_step_equivalent(original: nn.Module, candidate: nn.Module, inputs: Any,
                                 **kwargs: Any) -> EquivalenceReport:
    """:func:`train_step_equivalence`, raising ``AssertionError`` with the report if it fails."""
    report = train_step_equivalence(original, candidate, inputs, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report


def eval_equivalence(original: nn.Module, candidate: nn.Module, inputs: Any, *,
                     rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0) -> EquivalenceReport:
    """Compare eval-mode outputs (no grad) of ``candidate`` and ``original``; state is restored."""
    inputs = _as_tuple(inputs)
    snap_o = snapshot_state(original)
    snap_c = snapshot_state(candidate)
    report = EquivalenceReport(mode="eval", rtol=rtol, atol=atol)
    try:
        out_o, _ = _run(original, inputs, seed, False, False, None, seed + 1)
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)
        out_c, _ = _run(candidate, inputs, seed, False, False, None, seed + 1)
    finally:
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)
    _compare_outputs(report, out_o, out_c, rtol, atol)
    return report


def assert_eval_equivalent(original: nn.Module, candidate: nn.Module, inputs: Any,
                           **kwargs: Any) -> EquivalenceReport:
    """:func:`eval_equivalence`, raising ``AssertionError`` with the report if it fails."""
    report = eval_equivalence(original, candidate, inputs, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report


def assert_follows_alpha(original: nn.Module, candidate: nn.Module, inputs: Any, *,
                         arch_params: Optional[Sequence[torch.Tensor]] = None,
                         candidate_arch_params: Optional[Sequence[torch.Tensor]] = None,
                         scale: float = 1.0, train: bool = True, seed: int = 0,
                         rtol: float = 1e-5, atol: float = 1e-6,
                         min_change: float = 1e-4) -> None:
    """Check that ``candidate`` tracks in-place changes of the architecture parameters.

    Perturbs every arch parameter in place (``+= scale * N(0, 1)``, under ``no_grad``; the
    candidate's own copies, if it has any, get the same perturbation), then checks that the
    original's and the candidate's outputs both changed (relative change > ``min_change``) and
    are still equal to each other. Everything is restored afterwards.
    """
    inputs = _as_tuple(inputs)
    pairing = _Pairing(original, candidate, arch_params, candidate_arch_params)
    if not pairing.arch_o:
        raise ValueError("no architecture parameters found: pass arch_params=")
    snap_o = snapshot_state(original, extra_tensors=pairing.arch_o)
    snap_c = snapshot_state(candidate, extra_tensors=pairing.arch_c)

    def run(model: nn.Module):
        out, _ = _run(model, inputs, seed, train, False, None, seed + 1)
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)
        return out

    try:
        before_o = run(original)
        before_c = run(candidate)
        gen = torch.Generator().manual_seed(seed + 12345)
        noise = [torch.randn(a.shape, generator=gen, dtype=torch.float64) * scale
                 for a in pairing.arch_o]
        with torch.no_grad():
            for (_, a, c), z in zip(pairing.arch_counterparts(), noise):
                a.add_(z.to(a.dtype))
                if c is not a:
                    c.copy_(a)
        snap_o_pert = snapshot_state(original, extra_tensors=pairing.arch_o)
        snap_c_pert = snapshot_state(candidate, extra_tensors=pairing.arch_c)
        out_o, _ = _run(original, inputs, seed, train, False, None, seed + 1)
        restore_state(candidate, snap_c_pert)
        restore_state(original, snap_o_pert)
        out_c, _ = _run(candidate, inputs, seed, train, False, None, seed + 1)
    finally:
        restore_state(candidate, snap_c)
        restore_state(original, snap_o)

    messages = []

    def changed(before, after) -> float:
        worst = 0.0
        for (_, b), (_, a) in zip(before, after):
            if a.shape != b.shape:
                return math.inf
            c = _compare("output", "", a, b, 0.0, 0.0)
            worst = max(worst, c.rel_error)
        return worst

    ch_o = changed(before_o, out_o)
    ch_c = changed(before_c, out_c)
    if ch_o <= min_change:
        messages.append(f"original's output did not change when the arch parameters were "
                        f"perturbed (relative change {ch_o:.3e}); cannot test liveness")
    if ch_c <= min_change:
        messages.append(f"candidate's output did not follow the arch parameters (relative "
                        f"change {ch_c:.3e}, original changed by {ch_o:.3e}): arch parameters "
                        f"were probably frozen as constants")
    report = EquivalenceReport(mode="after alpha perturbation", rtol=rtol, atol=atol)
    _compare_outputs(report, out_o, out_c, rtol, atol)
    if not report.ok:
        messages.append(str(report))
    if messages:
        raise AssertionError("\n".join(messages))

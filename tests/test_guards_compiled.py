"""The compiled form of the drop-in guards (``topofx/capture/guards.py``): one generated check per captured
graph, a batched value guard, a hook scan only after a hook was registered, a cached call key.  Each
kind of change the step-by-step guards catch is still caught; the generated condition is exactly the
comparison of a fresh snapshot with the capture's.  (No timings here: ``topofx bench --overhead``.)"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import topofx
from topofx.capture.frames import CaptureError
from topofx.capture.guards import _Check, _snapshot


# ---------------------------------------------------------------------------------------------
# the generated condition is the snapshot comparison
# ---------------------------------------------------------------------------------------------
class _Opaque:
    pass


LIVE = torch.zeros(2)
HELD = torch.tensor([True, False])
OBJ = _Opaque()
NAN = math.nan
VALUES = [
    True, False, 1, 0, 1.0, 0.0, -0.0, NAN, math.nan, 2**70, "sep_conv_3x3", "", None, OBJ, _Opaque(),
    [], (), {}, [1, 2], [1, True], [1.0, 2], (1, 2), [[1, 2], [3]], [(1, 2), [3]], [[1, 2], (3,)],
    [["a", "b"], ["c"]], [["a", "b"], ["c", "d"]], {"normal": 1, "reduce": 2}, {"reduce": 2, "normal": 1},
    {"normal": [1, 2], "reduce": [3]}, {"normal": True}, {"normal": 1}, {1: "a"}, {True: "a"},
    [[[1]]], [[[[[1]]]]], [[[[[2]]]]], LIVE, torch.zeros(2), HELD, [HELD], {"normal": HELD}, {"normal": LIVE},
    [LIVE, 1], [OBJ], [None, None], [NAN], [1, [2, [3, "x"]]], [1, [2, [3, "y"]]],
]


def _compiled(read, snapshot, live):
    check = _Check()
    check.names["value"] = read
    check.expect("value[0]", snapshot, live)
    return check.build()


@pytest.mark.parametrize("before", range(len(VALUES)))
def test_generated_condition_is_the_snapshot_comparison(before):
    """For every pair of values: the compiled check holds exactly when ``_snapshot`` says equal -- types
    (``True`` and ``1`` differ), container kinds and order, tensors by identity or by value, NaN."""
    live = {id(LIVE)}
    snapshot = _snapshot(VALUES[before], live)
    cell = [None]
    check = _compiled(cell, snapshot, live)
    for after in VALUES:
        cell[0] = after
        assert check() == (_snapshot(after, live, copy=False) == snapshot), (VALUES[before], after)


@pytest.mark.parametrize("change", ["other shape", "other dtype", "other value"])
def test_a_tensor_held_by_value_changed_in_place_is_seen(change):
    """A tensor the graph read as a constant is compared by dtype and value (``torch.equal``, which also
    tells shapes apart: the same values in another shape are a change), as ``_TensorValue.__eq__`` does."""
    held = torch.tensor([1.0, 2.0])
    snapshot = _snapshot([held], set())
    check = _compiled([[held]], snapshot, set())
    assert check()
    before = held.data
    held.data = {"other shape": before.view(1, 2), "other dtype": before.double(),
                 "other value": torch.tensor([1.0, 3.0])}[change]
    assert not check() and _snapshot([held], set(), copy=False) != snapshot
    held.data = before
    assert check()


def test_a_tensor_held_by_value_on_another_device_is_a_change_not_an_error():
    """The step-by-step comparison of a tensor held by value (``_TensorValue``) that is now on another device
    (a CUDA model's mask moved in place; the meta device stands in for it here) says "changed": it does not
    raise out of ``torch.equal``, which refuses tensors on two devices, and out of the call."""
    held = torch.tensor([1.0, 2.0])
    (_, (snapshot,)) = _snapshot([held], set())
    moved = copy.copy(snapshot)
    moved.value = held.to("meta")
    assert not snapshot == moved and not moved == snapshot


def test_a_container_changed_in_place_is_seen():
    live: set[int] = set()
    names = [["sep_conv_3x3", "skip_connect"], ["none"]]
    flags = {"normal": torch.tensor([True, True])}
    cell = [names, flags]
    check = _Check()
    check.names["value"] = cell
    check.expect("value[0]", _snapshot(names, live), live)
    check.expect("value[1]", _snapshot(flags, live), live)
    holds = check.build()
    assert holds()
    names[1][0] = "max_pool_3x3"
    assert not holds()
    names[1][0] = "none"
    assert holds()
    flags["normal"][1] = False  # a tensor read as a constant: by value
    assert not holds()


def test_a_container_read_by_several_attributes_is_compared_exactly_for_each():
    """Every cell's ``primitives`` is one list: compared item by item once, then by identity -- and item
    by item again for an attribute that holds another object."""
    live: set[int] = set()
    shared = [["none", "skip_connect"], ["sep_conv_3x3"]]
    cells = [{"primitives": shared} for _ in range(3)]
    check = _Check()
    check.names["cells"] = cells
    for i, cell in enumerate(cells):
        check.expect(f"cells[{i}].get('primitives', _MISSING)", _snapshot(shared, live), live, cell["primitives"])
    holds = check.build()
    assert holds() and "is _s0" in "".join(check.conditions)
    cells[2]["primitives"] = copy.deepcopy(shared)  # another object, equal: holds
    assert holds()
    cells[2]["primitives"][1][0] = "dil_conv_3x3"  # that object changed
    assert not holds()
    cells[2]["primitives"] = shared
    shared[0][1] = "max_pool_3x3"  # the shared list changed: the first comparison fails
    assert not holds()
    shared[0][1] = "skip_connect"
    cells[0]["primitives"] = [["none", "skip_connect"], ["sep_conv_3x3"]]  # the first read: another, equal object
    assert holds()
    cells[0]["primitives"] = [["none", True], ["sep_conv_3x3"]]
    assert not holds()


def test_equal_snapshots_share_their_constants_and_each_container_is_still_compared():
    """Every cell's ``edge2index`` is its own dict with equal items: the check compares each against one
    shared list of the items (the same objects), and an in-place write into any one cell's dict -- a
    value, a value of another type, a key -- is still a change."""
    live: set[int] = set()
    cells = [{"edge2index": {"1<-0": 0, "2<-0": 1, "2<-1": 2}} for _ in range(3)]
    check = _Check()
    check.names["cells"] = cells
    for i, cell in enumerate(cells):
        check.expect(f"cells[{i}].get('edge2index', _MISSING)", _snapshot(cell["edge2index"], live), live, cell["edge2index"])
    holds = check.build()
    assert holds()
    shared = [name for name, value in check.names.items() if value == [0, 1, 2]]
    assert len(shared) == 1 and len(check.conditions) == 3 and all(shared[0] in c for c in check.conditions)
    for change in (lambda d: d.__setitem__("2<-1", 1), lambda d: d.__setitem__("2<-1", 2.0),
                   lambda d: d.__setitem__("2<-0", True), lambda d: d.update({"3<-2": d.pop("2<-1")})):
        edges = copy.deepcopy(cells[2]["edge2index"])
        change(cells[2]["edge2index"])
        assert not holds()
        cells[2]["edge2index"] = edges
        assert holds()


# ---------------------------------------------------------------------------------------------
# every kind of change, through a simplified module
# ---------------------------------------------------------------------------------------------
class _Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.Identity()])
        self.scale = 1  # a Python number read by traced code (a float would be a graph input: test_float_inputs.py)

    def forward(self, x, weights):
        return self.scale * sum(w * op(x) for w, op in zip(weights, self.ops) if w != 0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleList([_Cell(), _Cell()])
        self.alpha = nn.Parameter(torch.zeros(2, 3))

    def forward(self, x):
        weights = self.alpha.softmax(-1)
        for cell, w in zip(self.cells, weights):
            x = cell(x, w)
        return x


def _simplified():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 3, 8, 8)
    return model, topofx.simplify(model, x, mode="exact", strict=True), x


def test_unchanged_model_passes_the_compiled_check_and_keeps_its_graph():
    model, simplified, x = _simplified()
    graph = simplified.graph_module
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(simplified(x), model(x))
    assert simplified.guards.holds() and simplified.graph_module is graph
    assert not simplified.__dict__.get("recaptured")


def test_number_change_recaptures():
    model, simplified, x = _simplified()
    graph = simplified.graph_module
    simplified(x)
    model.cells[1].scale = 0.5
    assert not simplified.guards.holds()
    torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is not graph
    assert simplified.guards.holds()  # the new graph's check, on the new number


def test_numbers_are_compared_after_an_assignment_only_and_each_one_is_seen():
    model, simplified, x = _simplified()
    simplified(x)
    assert not simplified.guards.assignments.assigned  # watched: nothing assigned since the last comparison
    model.train()  # assigns `training` on every module: compared once, nothing the graph read changed
    assert simplified.guards.assignments.assigned
    assert simplified.guards.holds() and not simplified.guards.assignments.assigned  # watched again
    for scale in (2, 3):  # each assignment after the watch is armed again is seen
        model.cells[0].scale = scale
        assert not simplified.guards.holds()
        torch.testing.assert_close(simplified(x), model(x))
        assert simplified.guards.holds()


def test_watching_again_keeps_one_watcher_per_module():
    from torch._dynamo.mutation_guard import MutationTracker

    model, simplified, x = _simplified()
    for step in range(20):  # one module assigned to every other call: the rest are watched again each time
        model.cells[0].tag = step
        simplified(x)
        simplified(x)
    assert [len(MutationTracker.db[m].watchers) for m in simplified.guards.assignments.modules] == [1, 1]


def test_a_module_assigned_to_before_every_call_is_compared_without_watching():
    model, simplified, x = _simplified()
    simplified(x)
    assignments = simplified.guards.assignments
    for _ in range(assignments.GIVE_UP + 2):
        simplified(x)
        model.cells[0].tag = "step"  # a per-step assignment the graph does not read
    assert assignments.assigned and simplified.guards.holds() and assignments.assigned  # compared, not watched
    model.cells[0].scale = 0.5
    assert not simplified.guards.holds()
    torch.testing.assert_close(simplified(x), model(x))


class _MethodCell(_Cell):
    def run(self, x, weights):  # called as a method by the parent: not a module call the tracer sees
        return self.scale * sum(w * op(x) for w, op in zip(weights, self.ops))


class _MethodNet(_Net):
    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleList([_MethodCell()])

    def forward(self, x):
        return self.cells[0].run(x, self.alpha[0].softmax(-1))


def test_a_number_read_by_a_method_of_a_submodule_is_watched_like_a_traced_modules():
    torch.manual_seed(0)
    model, x = _MethodNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    simplified(x)
    assert model.cells[0] in simplified.guards.assignments.modules and not simplified.guards.reads
    model.cells[0].scale = 0.5
    assert not simplified.guards.holds()
    torch.testing.assert_close(simplified(x), model(x))


def test_number_of_another_type_recaptures():
    model, simplified, x = _simplified()
    simplified(x)
    model.cells[0].scale = 1.0  # == 1, but another type: the trace may differ
    assert not simplified.guards.holds()


def test_value_decision_recaptures_and_is_batched():
    model, simplified, x = _simplified()
    guard = simplified.guards.value_guard
    assert len(guard.checks) == 6 and guard.holds(model)
    batched = guard._batched[id(model)][1]
    assert batched is not None and len(batched.groups) == 1 and not batched.singles  # one tensor, one torch.equal
    graph = simplified.graph_module
    with torch.no_grad():
        model.alpha.data[1, 2] = -math.inf  # through .data (no version bump); softmax weight 0: `if w != 0` drops it
    assert not guard.holds(model) and guard.changed(model)
    torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is not graph


def test_value_decisions_agree_with_node_by_node_evaluation():
    model, simplified, _ = _simplified()
    guard = simplified.guards.value_guard
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            model.alpha.copy_(torch.randn(2, 3, generator=gen))
            model.alpha[torch.rand(2, 3, generator=gen) < 0.3] = -math.inf
        assert guard.holds(model) == (not guard.changed(model))


class _TableDecision(nn.Module):
    """A value decision on a tensor read out of a dict: an FX constant of the graph module, the same object."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.table = {"normal": torch.tensor([1.0, 0.0])}
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])

    def forward(self, x):
        weights = self.alpha.softmax(-1) * self.table["normal"]
        return sum(w * conv(x) for w, conv in zip(weights, self.convs) if w != 0)


def test_value_decision_on_a_constant_held_by_the_graph_module():
    torch.manual_seed(0)
    model, x = _TableDecision(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = simplified.guards.value_guard
    assert guard.holds(model) and guard.holds(model)  # the second: the tensors read are unchanged
    assert any(not hasattr(model, target) for target in guard._batched[id(model)][1].leaves)  # the constant
    graph = simplified.graph_module
    model.table["normal"][1] = 1.0  # in place: the graph module's constant is this tensor
    assert not guard.holds(model)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is not graph


class _DecideThenWrite(nn.Module):
    """A decision on an element taken before an in-place write into its tensor: batching the ops after
    the write would read the written value."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])

    def forward(self, x):
        w = self.alpha.softmax(-1) * 1.0  # (softmax's backward needs its own output unwritten)
        first = self.convs[0](x) if w[0] != 0 else x
        w[0] = 0.0
        return first + (self.convs[1](x) if w[0] != 0 else x) * w[1]


def test_decision_before_an_in_place_write_is_not_batched_across_it():
    torch.manual_seed(0)
    model, x = _DecideThenWrite(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = simplified.guards.value_guard
    assert [expected for _, expected, _ in guard.checks] == [True, False]
    assert guard.holds(model) and simplified.guards.holds()
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), model(x))
    assert not simplified.__dict__.get("recaptured")


def test_reassigned_tensor_is_rebound_without_recapture():
    model, simplified, x = _simplified()
    simplified(x)
    graph = simplified.graph_module
    del model._parameters["alpha"]
    model.alpha = nn.Parameter(torch.randn(2, 3))
    assert not simplified.guards.holds()
    torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is graph and simplified.guards.holds()  # re-bound: the check compiled anew


def test_new_hook_after_calls_warns_once():
    model, simplified, x = _simplified()
    for _ in range(3):
        simplified(x)
    fired = []
    model.cells[0].register_forward_hook(lambda *a: fired.append(1))  # a traced module: not called by the graph
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simplified(x)
        simplified(x)
    messages = [str(w.message) for w in caught if "will not fire" in str(w.message)]
    assert len(messages) == 1 and "cells.0" in messages[0] and not fired


def test_a_new_hook_warning_turned_into_an_error_is_raised():
    """The hook scan runs inside the compiled check; a warning the user turned into an error (``-W error``)
    is raised to them, not taken for a change of the model."""
    model, simplified, x = _simplified()
    simplified(x)
    model.cells[1].register_forward_hook(lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="will not fire"):
            simplified(x)


def test_copy_checks_its_own_model():
    """``copy.deepcopy`` (DARTS-V2's unrolled model): the copy's compiled check reads the copy's attributes."""
    model, simplified, x = _simplified()
    simplified(x)
    twin = copy.deepcopy(simplified)
    twin(x)
    twin.original.cells[0].scale = 0.5
    assert simplified.guards.holds() and not twin.guards.holds()
    model.cells[1].scale = 2.0
    assert not simplified.guards.holds()
    torch.testing.assert_close(twin(x), twin.original(x))
    torch.testing.assert_close(simplified(x), model(x))


def test_tensor_only_calls_bind_once():
    """A call of tensors alone binds to ``forward``'s signature at its first call; later ones with as many
    tensors are served without binding; others bind as before."""
    model, simplified, x = _simplified()
    assert "tensor_call" not in simplified.__dict__
    simplified(x)
    assert simplified.__dict__["tensor_call"] == (type(model).forward, 1)
    assert simplified.serving((x,), {}) is simplified
    assert simplified.serving((x, x), {}) is model  # forward() rejects it: the original raises the user's own error
    assert simplified.serving((), {"x": x}) is simplified  # keywords: bound, the same choice


# ---------------------------------------------------------------------------------------------
# the value guard's memo of the tensors it reads
# ---------------------------------------------------------------------------------------------
class _MaskedCell(nn.Module):
    """A cell that skips the candidates its own buffer masks out (a Python decision on a buffer's values)."""

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Identity()])
        self.register_buffer("keep", torch.ones(3))

    def forward(self, x, weights):
        return sum(w * op(x) for w, k, op in zip(weights, self.keep, self.ops) if k != 0)


class _MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))
        self.cells = nn.ModuleList([_MaskedCell(), _MaskedCell()])

    def forward(self, x):
        weights = self.alpha.softmax(-1)
        for cell in self.cells:
            x = cell(x, weights)
        return x


@pytest.mark.parametrize("write", ["data", "in_place"])
def test_a_write_into_one_of_several_guarded_tensors_is_caught(write):
    """The value guard reads the alphas and every cell's mask; with all of them unchanged since its last run
    it does not run again (one batched comparison), and a write into one cell's mask -- through ``.data``,
    which moves no version counter, or in place -- is still a change that captures the model again."""
    torch.manual_seed(0)
    model, x = _MaskedNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = simplified.guards.value_guard
    assert guard.holds(model) and guard.holds(model)
    batched = guard._batched[id(model)][1]
    assert batched is not None and batched.memo is not None and len(batched.leaves) == 2  # the two masks
    graph = simplified.graph_module
    if write == "data":
        model.cells[1].keep.data[2] = 0.0
    else:
        model.cells[1].keep[2] = 0.0
    assert not guard.holds(model)
    torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is not graph


def _memo_ready(simplified, model):
    """The value guard of ``simplified``, its batched program built and its memo taken."""
    guard = simplified.guards.value_guard
    assert guard.holds(model) and guard.holds(model)
    assert guard._batched[id(model)][1].memo is not None
    return guard


_MASK_CHANGES = {
    "cell swapped": lambda model: model.cells.__setitem__(1, _masked_cell(keep=(1.0, 1.0, 0.0))),
    "buffer re-assigned": lambda model: setattr(model.cells[1], "keep", torch.tensor([1.0, 0.0, 1.0])),
    "buffer of another dtype": lambda model: setattr(model.cells[1], "keep", torch.ones(3, dtype=torch.float64)),
    "buffer made a plain attribute": lambda model: object.__setattr__(model.cells[1], "keep", model.cells[1]._buffers.pop("keep")),
}


def _masked_cell(keep):
    cell = _MaskedCell()
    cell.keep.copy_(torch.tensor(keep))
    return cell


@pytest.mark.parametrize("change", list(_MASK_CHANGES))
def test_the_memo_check_agrees_with_the_step_by_step_evaluation(change):
    """The memo comparison reads each guarded tensor through the dictionary that held it at capture: a
    swapped cell, a re-assigned buffer, a tensor of another dtype (equal values), an attribute moved to
    another dictionary are read anew (none of them passes as the memo's tensors) -- and :meth:`holds` comes
    out as the step-by-step :meth:`changed` does."""
    torch.manual_seed(0)
    model, x = _MaskedNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = _memo_ready(simplified, model)
    batched = guard._batched[id(model)][1]
    _MASK_CHANGES[change](model)
    assert not batched.same(model, batched.memo)
    assert guard.holds(model) == (not guard.changed(model))
    if change in ("cell swapped", "buffer re-assigned"):
        assert not guard.holds(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))


def test_a_guarded_tensor_reshaped_in_place_misses_the_memo():
    """The memo's comparison tells shapes apart (``torch.equal``; its dtypes and devices are the memo's, read
    when it was taken): a mask reshaped through ``.data`` with the same values is no hold of the memo, and
    the call still agrees with the eager model."""
    torch.manual_seed(0)
    model, x = _MaskedNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = _memo_ready(simplified, model)
    batched = guard._batched[id(model)][1]
    keep = model.cells[1].keep
    keep.data = keep.data.view(3, 1)
    assert not batched.same(model, batched.memo)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))
    keep.data = keep.data.view(3)
    assert guard.holds(model) and batched.same(model, batched.memo)


def test_a_guarded_tensor_that_is_gone_is_a_change_not_an_error():
    """A guarded tensor that is gone makes the memo check's read miss: not a hold, nor an error -- the
    program decides, as the step-by-step evaluation does; the tensor back, the memo holds again."""
    torch.manual_seed(0)
    model, x = _MaskedNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = _memo_ready(simplified, model)
    batched = guard._batched[id(model)][1]
    del model.cells[1].keep  # the buffer gone: the dictionary read misses
    assert not batched.same(model, batched.memo)
    assert guard.holds(model) == (not guard.changed(model))  # the program reads what the evaluation reads
    model.cells[1].register_buffer("keep", torch.ones(3))
    assert guard.holds(model) and batched.same(model, batched.memo)


def test_a_guarded_constant_the_model_lacks_is_read_from_the_graph_module_until_the_model_has_it():
    """A guarded tensor read from a dict (FX's constant: the graph module holds it, the model has no attribute
    of that name) is compared as the graph module's object; an attribute of that name set on the model
    later is what the memo check reads instead, as ``getattr(model, name, constant)`` does."""
    class _FlagNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(3))
            self.flags = {"normal": torch.tensor([True, False, True])}
            self.ops = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Identity()])

        def forward(self, x):
            weights = self.alpha.softmax(-1)
            return sum(w * op(x) for w, f, op in zip(weights, self.flags["normal"], self.ops) if f)

    torch.manual_seed(0)
    model, x = _FlagNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    guard = _memo_ready(simplified, model)
    batched = guard._batched[id(model)][1]
    held = [t for t in batched.leaves if not hasattr(model, t)]
    assert held and batched.same(model, batched.memo)
    model.flags["normal"][1] = True  # in place, into the graph module's object
    assert not batched.same(model, batched.memo)
    model.flags["normal"][1] = False
    assert batched.same(model, batched.memo)
    object.__setattr__(model, held[0], torch.tensor([True, True, True]))  # the model has it now
    assert not batched.same(model, batched.memo)


class _Record:
    """A plain object holding a tensor (an edge record of a graph-based space)."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale


class _HeldNet(nn.Module):
    """Tensors forward reads below plain attributes: a list, a dict of lists, a plain object."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gains = [torch.tensor(1.5), torch.tensor(0.5)]
        self.table = {"normal": [torch.full((3, 1, 1), 2.0)]}
        self.record = _Record(torch.tensor(0.25))

    def forward(self, x):
        y = self.conv(x)
        return y * self.gains[1] + self.table["normal"][0] * y + self.record.scale * x


@pytest.mark.parametrize("change", ["list item", "dict item", "record attribute"])
@pytest.mark.parametrize("how", ["same shape", "other shape", "gone"])
def test_a_held_tensor_replaced_or_gone_is_caught_by_the_compiled_check(change, how):
    """The compiled check reads a tensor held below a plain attribute (a list item, a dict's list item, a
    plain object's attribute) inline, through ``__dict__`` and items: its replacement is re-bound (same
    shape) or captured anew (another shape), and one that is gone is a change (captured anew: the model's
    forward raises, and so does the call, never a graph run); every call agrees with the eager model."""
    torch.manual_seed(0)
    model, x = _HeldNet(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), model(x))
    assert simplified.guards.holds()
    container, key = {"list item": (model.gains, 1), "dict item": (model.table["normal"], 0),
                      "record attribute": (vars(model.record), "scale")}[change]
    old = container[key]
    if how == "gone":
        del container[key]
        assert simplified.guards.verdict((x,)) == "recapture"  # the compiled check's read raises: a change
        with pytest.raises(Exception) as eager, torch.no_grad():
            model(x)
        with pytest.raises((type(eager.value), CaptureError)), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified(x)
        return
    container[key] = torch.randn_like(old) if how == "same shape" else torch.randn(3, 1, 1)
    assert not simplified.guards.holds()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))
        assert simplified.guards.holds()
        container[key].add_(1.0)  # written in place: the graph reads the tensor live
        torch.testing.assert_close(simplified(x), model(x))

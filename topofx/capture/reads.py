"""Which Python values traced code read, wherever they live, so that none is baked in unguarded.

A trace turns every Python number forward reads into a constant of the graph.  The attributes of
the modules whose forward is traced are guarded by :mod:`topofx.capture.guards` directly; a number read
from anywhere else -- a module-level scheduler object (``scheduler.decay_rate``), a global, a
closure, a class attribute, an attribute of a plain object held by a module (``self.cfg.tau``) --
would otherwise stay frozen at its capture-time value after the training loop changes it.

:class:`ReadRecorder` watches the trace with ``sys.settrace`` (frame starts only): for every frame of
user code (not the standard library's, torch's or topofx's) it keeps the frame's code, its globals, and the objects its arguments and
closure cells held on entry.  Each code object's bytecode is then read once for *access paths*:
a global, a closure variable or an argument followed by attribute loads and constant subscripts
(``scheduler.decay_rate``, ``CONFIG["tau"]``, ``self.cfg.tau``, ``type(self).scale``).  Every path that resolves, without
running user code (no properties, no ``__getattr__``), to a Python scalar or a tuple/list/dict of
them becomes a :class:`Read`, which the guards snapshot at capture and compare before each call.  A
path that ends at a plain object (``self.cfg``, a global scheduler) or a container of them stands for
every number below it under a name the recorded code uses (an attribute name or string constant in
its bytecode): forward may alias the object (``cfg = self.cfg; x / cfg.tau``).

:meth:`ReadRecorder.attributes_read` says under which names the recorded code can have read an
attribute of a traced module (the guards compare only those attributes), or that it cannot tell
(``vars(self)``, ``getattr(self, f"op{i}")``).

Not seen (documented in ``docs/capture.md``): objects reached only through locals that no path
leads to (values returned by functions or library methods), ``getattr(obj, name)`` with a name built
at run time, a closure over a bare number rebound with ``nonlocal``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import dis
import functools
import gc
import inspect
import sys
import types
from typing import Any, Callable, Iterator

import torch
from torch import nn

MISSING = object()  # a path that does not resolve (any more)
_ROOTS = {"LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST", "LOAD_FAST_CHECK"}
_SKIPPED_MODULES = ("torch", "numpy", "math", "builtins", "typing", "functools", "operator", "collections")


@dataclasses.dataclass(frozen=True, eq=False)
class Read:
    """One access path traced code took: ``steps`` applied to ``root`` (a globals dict, or the object a
    closure variable or an argument held), each ``("item", key)``, ``("attr", name)`` or, for
    ``type(obj).attr``, ``("type", None)``."""

    root: Any
    steps: tuple[tuple[str, Any], ...]
    where: str  # how the user wrote it: "scheduler.decay_rate"

    def value(self) -> Any:
        return resolve(self.root, self.steps)

    def __deepcopy__(self, memo: dict) -> "Read":
        """A copy of the model (``copy.deepcopy``: DARTS-V2's unrolled model) reads its own modules and
        the same outside world: a module root is copied with the model, any other root (a globals
        dict, a scheduler object) is the very object the copy's forward reads."""
        root = copy.deepcopy(self.root, memo) if isinstance(self.root, nn.Module) else memo.get(id(self.root), self.root)
        return Read(root, self.steps, self.where)


def _attr(obj: Any, name: str) -> Any:
    """``obj.name`` without running user code: instance or class dictionaries (and a module's
    parameters, buffers and submodules); descriptors other than plain values count as missing."""
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    try:
        value = inspect.getattr_static(obj, name)
    except (AttributeError, TypeError):
        return MISSING
    if isinstance(value, (property, types.MemberDescriptorType, types.GetSetDescriptorType, classmethod,
                          staticmethod)):
        return MISSING
    return value


def resolve(root: Any, steps: tuple[tuple[str, Any], ...]) -> Any:
    obj = root
    for kind, key in steps:
        if kind == "type":
            obj = type(obj)
        elif kind == "attr":
            obj = _attr(obj, key) if key != "__class__" else type(obj)
        else:
            try:
                obj = obj[key] if isinstance(obj, (dict, list, tuple)) else MISSING
            except (KeyError, IndexError, TypeError):
                return MISSING
        if obj is MISSING:
            return MISSING
    return obj


@functools.lru_cache(maxsize=1024)
def _paths(code: types.CodeType) -> list[tuple[str, str, tuple[tuple[str, Any], ...]]]:
    """(root opcode, root name, steps) of every access path in ``code`` with at least one step
    (a bare global or closure number: zero steps, kept too)."""
    out = []
    instructions = list(dis.get_instructions(code))
    i = 0
    while i < len(instructions):
        ins = instructions[i]
        if ins.opname not in _ROOTS:
            i += 1
            continue
        root, name, steps = ins.opname, ins.argval, []
        i += 1
        if name == "type" and root == "LOAD_GLOBAL" and i + 1 < len(instructions):  # type(self).attr
            arg, calls = instructions[i], [x.opname for x in instructions[i + 1:i + 3]]
            if arg.opname in _ROOTS and "CALL" in calls and instructions[i + 1 + calls.index("CALL")].arg == 1:
                root, name, steps = arg.opname, arg.argval, [("type", None)]
                i += 2 + calls.index("CALL")
        while i < len(instructions):
            nxt = instructions[i]
            if nxt.opname == "LOAD_ATTR" and not (sys.version_info >= (3, 12) and nxt.arg & 1):  # 3.12: method load
                steps.append(("attr", nxt.argval))
                i += 1
            elif (nxt.opname == "LOAD_CONST" and i + 1 < len(instructions)
                  and instructions[i + 1].opname == "BINARY_SUBSCR" and isinstance(nxt.argval, (int, str))):
                steps.append(("item", nxt.argval))
                i += 2
            else:
                break
        if steps or root != "LOAD_FAST":
            out.append((root, name, tuple(steps)))
    return out


def _skipped_root(obj: Any) -> bool:
    """Library modules and what lives in them (``torch.float32``, ``math.pi``): constants."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__.split(".")[0] in _SKIPPED_MODULES
    return isinstance(obj, (torch.Tensor, torch.fx.Proxy)) or callable(obj) and not isinstance(obj, (type, nn.Module))


class ReadRecorder:
    """Record the user frames a trace runs (``with ReadRecorder(is_library) as r: ...``), then
    :meth:`reads` gives the guarded access paths (see the module docstring)."""

    def __init__(self, is_library: Callable[[str], bool], paused: Callable[[], bool] = lambda: False,
                 methods: frozenset[types.CodeType] = frozenset()):
        self._library = is_library
        self._paused = paused  # e.g. while the tracer runs a module on meta copies to learn shapes
        self._methods = methods  # library methods of the model's module classes (:func:`module_methods`)
        self._user: dict[types.CodeType, bool] = {}
        self._frames: list[tuple[types.CodeType, dict, dict[str, Any], dict[str, Any]]] = []
        self._seen: set[tuple] = set()
        self._methods_run: set[types.CodeType] = set()

    def _on_call(self, frame: types.FrameType, event: str, arg: Any) -> None:
        """``sys.settrace`` hook: called when a Python frame starts; returns ``None`` (no line events)."""
        code = frame.f_code
        user = self._user.get(code)
        if user is None:
            user = self._user[code] = not self._library(code.co_filename)
        if self._paused():
            return
        if not user:
            if code in self._methods:
                self._methods_run.add(code)
            return
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        local = frame.f_locals
        # roots only (no tensors, traced values, functions): a helper called with new tensors each time is one frame
        args = {n: local[n] for n in names if n in local and not _skipped_root(local[n])}
        free = {n: local[n] for n in code.co_freevars if n in local and not _skipped_root(local[n])}
        key = (code, tuple(id(v) for v in args.values()), tuple(id(v) for v in free.values()))
        if key not in self._seen:
            self._seen.add(key)
            self._frames.append((code, frame.f_globals, args, free))

    def __enter__(self) -> "ReadRecorder":
        self._outer = sys.gettrace()  # a debugger's or coverage's tracer pauses while the trace runs
        # no automatic collection while recording: a gc callback (hypothesis, a profiler) would run
        # inside some frame of the trace, and its reads are not forward's
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._outer)
        if self._gc_was_enabled:
            gc.enable()

    def names(self) -> set[str]:
        """Every attribute name and string constant in the recorded user code: what ``x.name``,
        ``getattr(x, "name")`` or ``x["name"]`` can read, whatever ``x`` is (a local alias too) --
        but not a name the code loads only off a library module (``torch.argmax``), which reads no
        user object: an edge record's per-step ``argmax`` is not compared because of it."""
        frames = {code: globals_ for code, globals_, _, _ in self._frames}
        return {n for code, globals_ in frames.items() for n in _code_names(code, globals_)}

    def attributes_read(self) -> frozenset[str] | None:
        """The names under which the traced code can have read an attribute of a traced module: the
        recorded user code's :meth:`names`, and the names in the library methods of the model's module
        classes that ran (``Conv2d._conv_forward`` reading ``self.padding`` for a subclass traced
        through).  ``None`` when recorded user code reads attributes by names it does not spell
        (``vars(self)``, ``self.__dict__``, ``getattr(self, f"op{i}")``: :func:`reads_unnamed`): then
        any attribute may have been read."""
        codes = {f[0] for f in self._frames}
        if any(map(reads_unnamed, codes)):
            return None
        return frozenset(self.names()).union(*(_code_names(c) for c in self._methods_run))

    def reads(self, skip: Callable[[Any, tuple], bool]) -> list[Read]:
        """The recorded paths that resolve to Python values worth guarding; ``skip(root, steps)``
        drops paths guarded elsewhere (a traced module's own attributes).  A path that ends at a plain
        object (``self.cfg``, a global ``SCHEDULER``) stands for the numbers below it that recorded code
        names (:meth:`names`): forward may alias it (``cfg = self.cfg; x / cfg.tau``), which no path shows."""
        out: dict[tuple, Read] = {}
        names = self.names()
        for code, globals_, args, free in self._frames:
            for op, name, steps in _paths(code):
                for root, full in self._roots(op, name, steps, globals_, args, free):
                    for path in _guarded_paths(resolve(root, full), full, names, self._library):
                        holder = resolve(root, path[:-1]) if path else root
                        key = (id(holder), path[-1] if path else None)
                        if key not in out and not skip(root, path):
                            out[key] = Read(root, path, _describe(name, steps + path[len(full):]))
        return list(out.values())

    @staticmethod
    def _roots(op: str, name: str, steps: tuple, globals_: dict, args: dict, free: dict) -> Iterator[tuple]:
        if op == "LOAD_GLOBAL":
            holder = globals_ if name in globals_ else vars(sys.modules["builtins"])
            first = holder.get(name, MISSING)
            if first is not MISSING and not _skipped_root(first):
                yield holder, (("item", name), *steps)
        elif op == "LOAD_DEREF" and name in free and steps:
            yield free[name], steps  # the object keeps its identity (a bare number rebound by `nonlocal`: not seen)
        elif name in args:
            yield args[name], steps


def _code_names(code: types.CodeType, globals_: dict | None = None) -> set[str]:
    """The attribute and global names ``code`` loads, and its string constants; given its globals,
    without the names it loads only as attributes of library modules (:func:`_library_only`)."""
    names = set(code.co_names) - (_library_only(code, globals_) if globals_ is not None else set())
    return names.union(c for c in code.co_consts if type(c) is str)


@functools.lru_cache(maxsize=1024)
def _attributes_of_globals(code: types.CodeType) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """(global, attribute) of every attribute ``code`` loads straight off a global (``torch.argmax``),
    and every name it uses otherwise (``x.argmax``, a global's own name, a store)."""
    off_global, other = set(), set()
    instructions = list(dis.get_instructions(code))
    for prev, ins in zip([None, *instructions], instructions):
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and prev is not None and prev.opname == "LOAD_GLOBAL":
            off_global.add((prev.argval, ins.argval))
        elif ins.opcode in dis.hasname:
            other.add(ins.argval)
    return frozenset(off_global), frozenset(other)


def _library_only(code: types.CodeType, globals_: dict) -> set[str]:
    """The names ``code`` loads only as attributes of library modules it reads as globals."""
    off_global, other = _attributes_of_globals(code)
    on_library = {attr for name, attr in off_global if _library_module(globals_.get(name))}
    return on_library - {attr for name, attr in off_global if not _library_module(globals_.get(name))} - other


def _library_module(obj: Any) -> bool:
    return isinstance(obj, types.ModuleType) and _skipped_root(obj)


def module_methods(model: nn.Module) -> frozenset[types.CodeType]:
    """The code of every function the classes of ``model``'s modules define or inherit (their
    ``__mro__``; decorated functions unwrapped): code that reads a module's attributes as ``self``."""
    classes = {klass for m in model.modules() for klass in type(m).__mro__}
    return frozenset(inspect.unwrap(f).__code__ for klass in classes for f in vars(klass).values()
                     if isinstance(f, types.FunctionType) and isinstance(inspect.unwrap(f), types.FunctionType))


#: Names that enumerate an object's attributes or read one by a computed name.
_ENUMERATING = frozenset({"__dict__", "__getattribute__", "vars", "dir", "getmembers", "attrgetter", "getattr_static"})
_ROOT_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_DEREF", "LOAD_GLOBAL"})
_CALLS = (["PRECALL"], ["CALL"])


@functools.lru_cache(maxsize=1024)
def reads_unnamed(code: types.CodeType) -> bool:
    """Whether ``code`` can read an attribute whose name is not among its names and string constants:
    it enumerates attributes (``vars``, ``__dict__``, ``dir``...) or calls ``getattr``/``hasattr`` with
    anything but a string constant as the name (``getattr(self, "alpha", None)`` is fine).  Read from
    the bytecode; a ``getattr`` written any other way counts as unnamed."""
    if _ENUMERATING.intersection(code.co_names):
        return True
    if not {"getattr", "hasattr"}.intersection(code.co_names):
        return False
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.argval in ("getattr", "hasattr") and not _constant_name_call(instructions, i + 1):
            return True
    return False


def _constant_name_call(instructions: list[dis.Instruction], i: int) -> bool:
    """Whether ``instructions[i:]``, after ``getattr`` was loaded, read ``getattr(<path>, "<name>"[,
    <one load>])``: a path (a local, closure variable or global, then attribute loads and subscripts by
    a constant or a local), a string constant, then the call, or one load and the call."""
    ops = [(x.opname, x.argval) for x in instructions[i:i + 64]]
    if not ops or ops[0][0] not in _ROOT_LOADS:
        return False
    k = 1
    while k < len(ops):
        if ops[k][0] == "LOAD_ATTR":
            k += 1
        elif ops[k][0] in ("LOAD_CONST", "LOAD_FAST") and ops[k + 1:k + 2] and ops[k + 1][0] == "BINARY_SUBSCR":
            k += 2
        else:
            break
    if k >= len(ops) or ops[k][0] != "LOAD_CONST" or type(ops[k][1]) is not str:
        return False
    after = [op for op, _ in ops[k + 1:k + 3]]
    return after[:1] in _CALLS or (after[:1] != [] and after[0] in _ROOT_LOADS | {"LOAD_CONST"} and after[1:] in _CALLS)


def plain_object(obj: Any, is_library: Callable[[str], bool]) -> bool:
    """An object of the user's own class (a config, a scheduler, an edge record) or a namespace,
    whose attributes are data forward may read: not a module, tensor, class, function or module
    object, nor an instance of a library's class (torch's, the standard library's)."""
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
        return True
    if isinstance(obj, (nn.Module, torch.Tensor, type, types.ModuleType)) or callable(obj) or not hasattr(obj, "__dict__"):
        return False
    return not is_library(getattr(sys.modules.get(type(obj).__module__), "__file__", None) or "<>")


def _guarded_paths(value: Any, steps: tuple, names: set[str], is_library: Callable[[str], bool],
                   depth: int = 0) -> Iterator[tuple]:
    """``steps`` when ``value`` is worth guarding; below a plain object (or a list or dict of them),
    the paths to the guardable values under attribute names and keys in ``names``."""
    if _guardable(value):
        yield steps
    elif depth < 3 and plain_object(value, is_library):
        # its own attributes and its class's (``tau = 1.0`` in the class body): only a name the object or a
        # class of its MRO defines can resolve, so no other is looked up (a trace through code that makes
        # thousands of small objects, NNI's weight-slicing helpers, looked up every recorded name on each)
        defined = names.intersection(vars(value)).union(*(names.intersection(vars(k)) for k in type(value).__mro__))
        for key in sorted(defined):
            item = _attr(value, key)
            if item is not MISSING and not key.startswith("__"):
                yield from _guarded_paths(item, (*steps, ("attr", key)), names, is_library, depth + 1)
    elif depth < 3 and type(value) in (list, tuple, dict):
        items = value.items() if type(value) is dict else enumerate(value)
        for key, item in list(items):
            if isinstance(key, int) or key in names:
                yield from _guarded_paths(item, (*steps, ("item", key)), names, is_library, depth + 1)


def _guardable(value: Any, depth: int = 0) -> bool:
    """A Python scalar, or a tuple/list/dict of them: what a trace bakes into the graph."""
    if type(value) in (bool, int, float, str, type(None)):
        return value is not None or depth == 0
    if type(value) in (list, tuple) and depth < 3:
        return len(value) > 0 and all(_guardable(v, depth + 1) for v in value)
    if type(value) is dict and depth < 3:
        return len(value) > 0 and all(_guardable(v, depth + 1) for v in value.values())
    return False


def _describe(name: str, steps: tuple) -> str:
    text = name
    for kind, key in steps:
        text += f".{key}" if kind == "attr" else f"[{key!r}]"
    return text

"""Module calls of a simplified graph's generated code read the module tree's dictionaries directly.

FX's code calls a module at ``cells.0._ops.4.op.1`` as ``getattr(getattr(getattr(getattr(getattr(
self.cells, "0")._ops, "4").op, "1")(x)``: every step is a call of ``nn.Module.__getattr__``, a Python
function (a submodule is not an instance attribute).  A captured supernet calls each of its modules
from the graph's code, several levels deep: the DARTS supernet at the public codebases' size (C=4,
16x16, batch 2) made 12-16 thousand such calls per forward, 6-8 ms of a ~50 ms forward on one CPU
thread -- more than the original's own forward spends on attribute lookups (5.8 thousand), and the
margin by which topo mode's step lost to the original's there.

:func:`direct_module_calls` rewrites, in the generated code only, each such chain into
``self._modules["cells"]._modules["0"]...``: a dictionary read per level, the very dictionaries
``nn.Module.__getattr__`` reads.  The graph, its node targets, hooks and the module objects are
unchanged, and every call still reads the live module tree (a module replaced afterwards is the one
called).  A target is rewritten only where that chain was checked to resolve to the module
``get_submodule`` returns (a class attribute shadowing a submodule's name keeps FX's chain).  The
rewrite is a code transformer of the graph's code generator (``Graph.on_generate_code``), so later
recompilations and copies of the graph (``deepcopy``) keep it; it holds only strings.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

from torch.fx.graph import _format_target


def _direct(root: nn.Module, target: str) -> str | None:
    """``self._modules["a"]._modules["b"]...`` for ``target``, or None where that chain does not
    reach the module ``get_submodule`` returns."""
    module: object = root
    for name in target.split("."):
        table = getattr(module, "__dict__", {}).get("_modules")
        if not isinstance(table, dict) or name not in table:
            return None
        module = table[name]
    if module is not root.get_submodule(target):
        return None
    return "self" + "".join(f"._modules[{name!r}]" for name in target.split("."))


def _rewrite_line(line: str, chains: dict[str, str]) -> str:
    """``line`` with the call chain on its right-hand side replaced, when it is one of ``chains``."""
    head, sep, rhs = line.partition(" = ")
    if not sep or not rhs.startswith(("self.", "getattr(")):
        return line
    start = 0
    while (p := rhs.find("(", start)) != -1:
        direct = chains.get(rhs[:p])
        if direct is not None:
            return head + sep + direct + rhs[p:]
        start = p + 1
    return line


def _transformer(chains: dict[str, str]) -> Callable:
    """A body transformer (``Graph.on_generate_code``) after whatever transformer the graph had."""
    def make(previous: Callable | None) -> Callable:
        def transform(body: list[str]) -> list[str]:
            body = previous(body) if previous else body
            return ["\n".join(_rewrite_line(line, chains) for line in chunk.split("\n")) for chunk in body]
        return transform
    return make


def direct_module_calls(gm: fx.GraphModule) -> int:
    """Regenerate ``gm``'s code with its module calls read through ``_modules``; returns how many
    call targets were rewritten (none: the code is left as it is)."""
    chains = {}
    for target in {n.target for n in gm.graph.nodes if n.op == "call_module"}:
        direct = _direct(gm, target)
        if direct is not None:
            chains[_format_target("self", target)] = direct
    if chains:
        gm.graph.on_generate_code(_transformer(chains))
        gm.recompile()
    return len(chains)

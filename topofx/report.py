"""What ``simplify`` did, as a table a researcher can read: per pass and per edge."""
from __future__ import annotations

import dataclasses
from collections import Counter

from .rewrite import PassRun, Rewrite


NOT_REWRITES = ("canonical", "layout", "lowered")


@dataclasses.dataclass
class Report:
    """Per-pass summary, every rewrite record, and node/conv/BN counts before and after."""

    model: str
    mode: str
    passes: list[PassRun]
    before: dict[str, int]
    after: dict[str, int]
    edges: int = 0
    cells: int = 0
    fallback: str | None = None
    adapter: str | None = None  # the adapter that lifted the sampling out of forward (GDAS)
    decided_per_call: tuple[str, ...] = ()  # modules/methods run as one node: they decide on per-call draws
    value_decisions: int = 0  # Python decisions on architecture values, re-checked before every call
    sparse: int = 0  # gated candidates (topofx.sparse): each runs only on calls that select it

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for p in self.passes for r in p.rewrites]

    @property
    def approximate(self) -> list[Rewrite]:
        return [r for r in self.rewrites if not r.exact]

    def per_edge(self) -> dict[str, Counter]:
        """For each mixed edge (``cell/input->join``, as captured) that a rewrite touched: how many rewrites
        of each action touched it (a ReLU shared by two edges counts for both)."""
        table: dict[str, Counter] = {}
        for r in self.rewrites:
            for edge in r.edges:
                table.setdefault(edge, Counter())[r.action] += 1
        return table

    def rewritten_edges(self) -> Counter:
        """How many mixed edges each rewrite action touched, and under ``"any"`` how many any did (normal
        forms and lowerings, :data:`NOT_REWRITES`, change how a node computes, not what an edge computes)."""
        table = [set(actions) - set(NOT_REWRITES) for actions in self.per_edge().values()]
        counts = Counter(action for actions in table for action in actions)
        counts["any"] = sum(1 for actions in table if actions)
        return counts

    def __str__(self) -> str:
        lines = [f"topofx report: {self.model}, mode={self.mode}"]
        if self.fallback:
            lines.append(f"  fallback: not captured as one graph ({self.fallback}); running the original eagerly")
            return "\n".join(lines)
        lines.append(f"  found {self.edges} mixed edges" + (f" in {self.cells} cells" if self.cells else ""))
        if self.edges:
            touched = self.rewritten_edges()
            by_action = ", ".join(f"{a} {n}" for a, n in touched.items() if a != "any")
            lines.append(f"  rewritten: {touched['any']} of {self.edges} edges" + (f" ({by_action})" if by_action else ""))
        if self.decided_per_call:
            names = ", ".join(self.decided_per_call[:6]) + (", ..." if len(self.decided_per_call) > 6 else "")
            lines.append(f"  run per call: {len(self.decided_per_call)} modules/methods decide on values drawn every call "
                         f"and run as one node each, as written ({names})")
        if self.value_decisions:
            lines.append(f"  guarded: {self.value_decisions} Python decisions on architecture values, checked before "
                         "every call (a change captures the model anew)")
        if self.adapter:
            lines.append(f"  adapter: {self.adapter} (sampling runs eagerly before the graph)")
        if self.sparse:
            lines.append(f"  sparse: {self.sparse} candidates run only on the calls that select them (one sync per call)")
        header = f"  {'pass':<22}{'exact':<7}{'rewrites':>9}  {'actions':<28}{'nodes':>8}{'conv':>7}{'bn':>7}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for p in self.passes:
            actions = ", ".join(f"{a} {n}" for a, n in Counter(r.action for r in p.rewrites).items()) or "-"
            cols = f"{-p.removed['nodes']:>8}{-p.removed['conv']:>7}{-p.removed['bn']:>7}"
            lines.append(f"  {p.name:<22}{'yes' if p.exact else 'no':<7}{len(p.rewrites):>9}  {actions:<28}{cols}")
        lines.append(
            "  total: nodes {nodes0} -> {nodes1}, conv {conv0} -> {conv1}, bn {bn0} -> {bn1}".format(
                nodes0=self.before["nodes"], nodes1=self.after["nodes"], conv0=self.before["conv"],
                conv1=self.after["conv"], bn0=self.before["bn"], bn1=self.after["bn"],
            )
        )
        for p in self.passes:
            lines += [f"  rejected {p.name}: {why} (graph before it kept)" for why in p.rejected]
        approx = self.approximate
        lines.append(
            f"  approximate rewrites: {len(approx)} (vertex-exact: exact whenever an edge's weights are one-hot)"
            if approx else "  all rewrites are exact"
        )
        return "\n".join(lines)

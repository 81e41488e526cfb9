"""NAS-Bench-201: architecture names and benchmark look-ups for what a search found.

A search over the NAS-Bench-201 cell (``topofx simplify nb201-darts``) ends with a genotype; the
benchmark says how good it is.  This module converts between the three names an architecture has
and reads the benchmark's accuracies:

* the **arch string** ``|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|...|``
  (node 1 from node 0; node 2 from nodes 0, 1; node 3 from nodes 0, 1, 2; ``op~input``),
* the **genotype**: xautodl's ``Structure`` (what ``model.genotype()`` of its NAS-Bench-201
  supernets returns) or the same as a list of nodes, each a sequence of ``(op, input)`` pairs,
* the **index** ``0 <= i < 15625`` that the NAS-Bench-201 API (``nas_201_api``) and its benchmark
  file use.  The file does not list architectures in enumeration order: its authors enumerated the
  5**6 cells (first edge slowest, ops in :data:`OPS` order) and shuffled the list with Python's
  ``random.seed(88)``; this module computes the same order (checked against entries of the file).

:func:`open_api` reads a benchmark file (``NAS-Bench-201-v1_1-096897.pth``; a pickle, unpickled in
full: open only a file from a trusted source) through ``nas_201_api.NASBench201API``;
:meth:`Table.from_api` and :meth:`Table.save` (``topofx nb201 export``) keep its 200-epoch
accuracies as a plain JSON table of a few megabytes that :meth:`Table.load` reads in well under a
second, without unpickling anything.  ``docs/nb201.md`` describes the metrics and the table.
"""
from __future__ import annotations

import functools
import json
import numbers
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence, Tuple, Union

if TYPE_CHECKING:
    from nas_201_api import NASBench201API

__all__ = [
    "OPS", "EDGES", "NUM_ARCHS", "DATASETS", "METRICS", "NB201Error", "Record", "Table",
    "ops", "arch_str", "genotype", "index", "all_archs", "open_api", "api_record", "lookup",
    "export_table",
]

#: candidate operations, in the order of NAS-Bench-201's search space (and of its enumeration)
OPS: Tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: the cell's edges ``(node, input)`` in arch-string order
EDGES: Tuple[Tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
NUM_NODES = 3
NUM_ARCHS = len(OPS) ** len(EDGES)  # 15625
#: the benchmark's training sets: CIFAR-10 train split, CIFAR-10 train+valid, CIFAR-100, ImageNet16-120
DATASETS: Tuple[str, ...] = ("cifar10-valid", "cifar10", "cifar100", "ImageNet16-120")
#: per dataset: accuracy on its validation split and on its test split (the API's get_more_info)
METRICS: Tuple[str, ...] = ("valid", "test")
EPOCHS = "200"  # the API's ``hp``: the 200-epoch training runs

_SHUFFLE_SEED = 88
# entries of the benchmark file, as its generation script asserts them: they pin the shuffle
_KNOWN = {
    0: "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    9: "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|",
    123: "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|",
}
_TABLE_FORMAT = "topofx-nb201-table"
_TABLE_VERSION = 1
_OPS_TEXT = ", ".join(OPS)
_CELL_TEXT = "node 1 from node 0; node 2 from nodes 0, 1; node 3 from nodes 0, 1, 2"


class NB201Error(ValueError):
    """An architecture that is not a NAS-Bench-201 cell, or a file that is not a benchmark/table."""


class StructureLike(Protocol):
    """xautodl's ``Structure`` (``model.genotype()``): its ``nodes`` hold ``(op, input)`` pairs."""

    nodes: Sequence[Sequence[Tuple[str, int]]]


Genotype = Sequence[Sequence[Tuple[str, int]]]
#: an arch string, an index, a genotype (list of nodes of ``(op, input)`` pairs) or a ``Structure``
Arch = Union[str, int, Genotype, StructureLike]


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def _parse_str(text: str) -> list[list[tuple[str, int]]]:
    node_texts = text.strip().split("+")
    if len(node_texts) != NUM_NODES:
        raise NB201Error(
            f"arch string {text!r} has {len(node_texts)} node(s) separated by '+'; NAS-Bench-201 cells have "
            f"{NUM_NODES} ({_CELL_TEXT}), e.g. {_KNOWN[0]}"
        )
    nodes = []
    for node, node_text in enumerate(node_texts, 1):
        node_text = node_text.strip()
        if len(node_text) < 2 or not (node_text.startswith("|") and node_text.endswith("|")):
            raise NB201Error(f"node {node} of arch string {text!r} is {node_text!r}: write it as |op~input|...|")
        edges = []
        for token in node_text[1:-1].split("|"):
            op, sep, source = token.partition("~")
            if not sep or not source.isdigit():
                raise NB201Error(
                    f"bad edge {token!r} in node {node} of arch string {text!r}: write op~input, e.g. nor_conv_3x3~0"
                )
            edges.append((op, int(source)))
        nodes.append(edges)
    return nodes


def _nodes_of(arch: Any) -> tuple[list[list[tuple[str, int]]], str]:
    """The nodes of a string, ``Structure`` or list of nodes, and how to name ``arch`` in errors."""
    if isinstance(arch, str):
        return _parse_str(arch), f"arch string {arch!r}"
    nodes = getattr(arch, "nodes", arch)  # xautodl's Structure keeps the genotype in .nodes
    what = "genotype" if nodes is arch else f"{type(arch).__name__}.nodes"
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence):
        raise NB201Error(
            f"cannot read a NAS-Bench-201 architecture from a {type(arch).__name__}: give an arch string, an "
            "index, xautodl's Structure (model.genotype()) or a list of nodes of (op, input) pairs"
        )
    out = []
    for node, edges in enumerate(nodes, 1):
        if isinstance(edges, (str, bytes)) or not isinstance(edges, Sequence):
            raise NB201Error(
                f"node {node} of the {what} is a {type(edges).__name__}; give a sequence of (op, input) pairs"
            )
        pairs = []
        for edge in edges:
            if (isinstance(edge, (str, bytes)) or not isinstance(edge, Sequence) or len(edge) != 2
                    or not isinstance(edge[0], str) or not isinstance(edge[1], numbers.Integral)):
                raise NB201Error(
                    f"bad edge {edge!r} in node {node} of the {what}: give an (op, input) pair, e.g. ('nor_conv_3x3', 0)"
                )
            pairs.append((edge[0], int(edge[1])))
        out.append(pairs)
    return out, what


def ops(arch: Arch) -> Tuple[str, ...]:
    """The six op names of ``arch`` in :data:`EDGES` order (edges 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2).

    Edges within a node may come in any order; every edge must be given, ``none`` ones included.
    Raises :class:`NB201Error` naming the node, edge or op that is wrong.
    """
    if isinstance(arch, numbers.Integral) and not isinstance(arch, bool):
        return _code_ops(_codes()[0][_checked_index(arch)])
    nodes, what = _nodes_of(arch)
    if len(nodes) != NUM_NODES:
        raise NB201Error(f"the {what} has {len(nodes)} node(s); NAS-Bench-201 cells have {NUM_NODES} ({_CELL_TEXT})")
    found: dict[tuple[int, int], str] = {}
    for node, edges in enumerate(nodes, 1):
        inputs = sorted(source for _, source in edges)
        if inputs != list(range(node)):
            need = ", ".join(map(str, range(node)))
            raise NB201Error(
                f"node {node} of the {what} has {len(edges)} edge(s) from node(s) {inputs or 'none'}; it needs "
                f"{node}, one from each of node(s) {need} (6 edges in all; give 'none' edges too)"
            )
        for op, source in edges:
            if op not in OPS:
                raise NB201Error(
                    f"unknown op {op!r} on edge {node}<-{source} of the {what}; NAS-Bench-201's ops are {_OPS_TEXT}"
                )
            found[(node, source)] = op
    return tuple(found[edge] for edge in EDGES)


def _ops_str(names: Sequence[str]) -> str:
    nodes = []
    for node in range(1, NUM_NODES + 1):
        nodes.append("|" + "|".join(f"{names[e]}~{src}" for e, (dst, src) in enumerate(EDGES) if dst == node) + "|")
    return "+".join(nodes)


def arch_str(arch: Arch) -> str:
    """The NAS-Bench-201 arch string of ``arch`` (edges of a node ordered by input, as the API writes them)."""
    return _ops_str(ops(arch))


def genotype(arch: Arch) -> list[tuple[tuple[str, int], ...]]:
    """``arch`` as a list of nodes of ``(op, input)`` pairs: what xautodl's ``Structure(...)`` takes
    and the API's ``NASBench201API.str2lists`` returns."""
    names = ops(arch)
    return [tuple((names[e], src) for e, (dst, src) in enumerate(EDGES) if dst == node)
            for node in range(1, NUM_NODES + 1)]


def _checked_index(i: int) -> int:
    if not 0 <= i < NUM_ARCHS:
        raise NB201Error(f"index {i} is out of range: NAS-Bench-201 indexes are 0..{NUM_ARCHS - 1}")
    return int(i)


def _ops_code(names: Sequence[str]) -> int:
    code = 0
    for name in names:  # first edge most significant, as the enumeration nests its loops
        code = code * len(OPS) + OPS.index(name)
    return code


def _code_ops(code: int) -> Tuple[str, ...]:
    names = []
    for _ in EDGES:
        code, digit = divmod(code, len(OPS))
        names.append(OPS[digit])
    return tuple(reversed(names))


@functools.lru_cache(maxsize=1)
def _codes() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(code of index i, index of code c)``: the benchmark's shuffle of the enumeration."""
    code_of = list(range(NUM_ARCHS))
    random.Random(_SHUFFLE_SEED).shuffle(code_of)
    for i, known in _KNOWN.items():
        if _ops_str(_code_ops(code_of[i])) != known:
            raise RuntimeError(
                f"this Python's random.shuffle does not reproduce NAS-Bench-201's order (index {i} should be "
                f"{known}); topofx cannot compute NAS-Bench-201 indexes here, please report"
            )
    index_of = [0] * NUM_ARCHS
    for i, code in enumerate(code_of):
        index_of[code] = i
    return tuple(code_of), tuple(index_of)


def index(arch: Arch) -> int:
    """The NAS-Bench-201 API's index of ``arch`` (an index is range-checked and returned)."""
    if isinstance(arch, numbers.Integral) and not isinstance(arch, bool):
        return _checked_index(arch)
    return _codes()[1][_ops_code(ops(arch))]


@functools.lru_cache(maxsize=1)
def all_archs() -> Tuple[str, ...]:
    """Every arch string, in index order: the ``meta_archs`` of the benchmark file."""
    return tuple(_ops_str(_code_ops(code)) for code in _codes()[0])


# ---------------------------------------------------------------------------------------------
# accuracies
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One architecture's 200-epoch accuracies (percent, mean over the benchmark's trials).

    ``accuracy[dataset][metric]`` for ``dataset`` in :data:`DATASETS`, ``metric`` in :data:`METRICS`;
    ``None`` where the benchmark has no such number (``cifar10`` has no validation split) or did not
    train the architecture.
    """

    index: int
    arch: str
    accuracy: Mapping[str, Mapping[str, Optional[float]]]
    source: str

    @property
    def evaluated(self) -> bool:
        return any(v is not None for per in self.accuracy.values() for v in per.values())

    def format(self) -> str:
        """Human-readable: the names, then a dataset x metric table (``-`` where there is no number)."""
        lines = [f"NAS-Bench-201 index {self.index}: {self.arch}"]
        if not self.evaluated:
            lines.append(f"  not evaluated in {self.source}")
            return "\n".join(lines)
        lines.append(f"  {self.source}: accuracy (%), {EPOCHS} epochs, mean over trials")
        lines.append(f"  {'dataset':<16}" + "".join(f"{m:>8}" for m in METRICS))
        for dataset in DATASETS:
            cells = [self.accuracy[dataset][m] for m in METRICS]
            lines.append(f"  {dataset:<16}" + "".join(f"{'-' if v is None else f'{v:.2f}':>8}" for v in cells))
        return "\n".join(lines)


def _empty_accuracy() -> dict[str, dict[str, Optional[float]]]:
    return {dataset: {m: None for m in METRICS} for dataset in DATASETS}


class Table:
    """NAS-Bench-201's 200-epoch accuracies of every architecture, from a compact JSON table.

    ``Table.load("nb201.json").accuracy(model.genotype(), "cifar10")`` -> test accuracy in percent.
    Write the table once from the benchmark file with :func:`export_table` (``topofx nb201 export``).
    """

    def __init__(self, accuracy: Mapping[str, Mapping[str, Sequence[Optional[float]]]], source: str) -> None:
        self.source = source
        self._acc = {d: {m: list(accuracy[d][m]) for m in METRICS} for d in DATASETS}

    def __len__(self) -> int:
        return NUM_ARCHS

    @property
    def evaluated(self) -> int:
        """How many architectures have at least one accuracy."""
        return sum(any(self._acc[d][m][i] is not None for d in DATASETS for m in METRICS) for i in range(NUM_ARCHS))

    def lookup(self, arch: Arch) -> Record:
        """Every accuracy of ``arch`` (arch string, index, genotype or ``Structure``)."""
        i = index(arch)
        acc = {d: {m: self._acc[d][m][i] for m in METRICS} for d in DATASETS}
        return Record(i, all_archs()[i], acc, self.source)

    def accuracy(self, arch: Arch, dataset: str = "cifar10", metric: str = "test") -> Optional[float]:
        """One accuracy of ``arch`` in percent; ``None`` where the benchmark has none."""
        if dataset not in DATASETS:
            raise NB201Error(f"unknown dataset {dataset!r}; NAS-Bench-201's are {', '.join(DATASETS)}")
        if metric not in METRICS:
            raise NB201Error(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        return self._acc[dataset][metric][index(arch)]

    @classmethod
    def from_api(cls, api: NASBench201API, source: str) -> Table:
        """The accuracies of every architecture ``api`` has results for (see :func:`api_record`)."""
        acc = {d: {m: [None] * NUM_ARCHS for m in METRICS} for d in DATASETS}
        for i in api.evaluated_indexes:
            record = api_record(api, i, source)
            for d in DATASETS:
                for m in METRICS:
                    acc[d][m][i] = record.accuracy[d][m]
        return cls(acc, source)

    def save(self, path: str | Path) -> None:
        """Write the table as JSON: arch strings and, per dataset and metric, one list in index order."""
        data = {
            "format": _TABLE_FORMAT, "version": _TABLE_VERSION, "source": self.source, "epochs": int(EPOCHS),
            "reduction": "mean over trials", "unit": "percent", "datasets": list(DATASETS),
            "metrics": list(METRICS), "archs": list(all_archs()), "accuracy": self._acc,
        }
        try:
            Path(path).write_text(json.dumps(data, separators=(",", ":")))
        except OSError as exc:
            raise NB201Error(f"cannot write the table to {path}: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Table:
        """Read a table written by :meth:`save`; raises :class:`NB201Error` for anything else."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NB201Error(f"table not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NB201Error(f"cannot read {path} as a NAS-Bench-201 table: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _TABLE_FORMAT:
            raise NB201Error(f"{path} is not a NAS-Bench-201 table written by topofx nb201 export")
        if data.get("version") != _TABLE_VERSION:
            raise NB201Error(
                f"{path} is a version {data.get('version')} table; this topofx reads version {_TABLE_VERSION}"
            )
        if data.get("archs") != list(all_archs()):
            raise NB201Error(f"{path}: its architectures are not NAS-Bench-201's, in the API's index order")
        acc = data.get("accuracy")
        for d in DATASETS:
            for m in METRICS:
                values = (acc or {}).get(d, {}).get(m)
                if not isinstance(values, list) or len(values) != NUM_ARCHS:
                    raise NB201Error(f"{path}: no list of {NUM_ARCHS} {m} accuracies for {d}")
        return cls(acc, str(data.get("source", path.name)))


# ---------------------------------------------------------------------------------------------
# the benchmark file, through the nas-bench-201 API
# ---------------------------------------------------------------------------------------------
class _NoCopyDict(dict):
    """The API deep-copies a dict it is given; a benchmark of several GB need not be held twice."""

    def __deepcopy__(self, memo: dict) -> _NoCopyDict:
        return self


def open_api(path: str | Path) -> NASBench201API:
    """``nas_201_api.NASBench201API`` over the benchmark file at ``path``.

    The file is a pickle (``torch.save``), unpickled in full -- which can run any code the file
    holds: open only a file from a trusted source (the NAS-Bench-201 authors' download).  topofx
    loads it itself with ``weights_only=False`` (the API's own ``torch.load`` gets torch's
    restricted loader since torch 2.6) and checks that its architectures are NAS-Bench-201's in
    the order :func:`index` computes.
    """
    try:
        from nas_201_api import NASBench201API
    except ImportError:
        raise NB201Error("reading a benchmark file needs the NAS-Bench-201 API: pip install nas-bench-201") from None
    import torch

    path = Path(path)
    if not path.is_file():
        raise NB201Error(f"benchmark file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not a benchmark file
        raise NB201Error(f"cannot load {path} as a NAS-Bench-201 benchmark file: {type(exc).__name__}: {exc}") from None
    keys = ("meta_archs", "arch2infos", "evaluated_indexes")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise NB201Error(f"{path} is not a NAS-Bench-201 benchmark file: it needs {', '.join(keys)}; found {found}")
    meta = list(data["meta_archs"])
    if meta != list(all_archs()):
        if len(meta) != NUM_ARCHS:
            raise NB201Error(f"{path} lists {len(meta)} architectures; NAS-Bench-201 has {NUM_ARCHS}")
        i = next(i for i, (got, want) in enumerate(zip(meta, all_archs())) if got != want)
        raise NB201Error(f"{path}: architecture {i} is {meta[i]}, NAS-Bench-201's is {all_archs()[i]}; "
                         "not a NAS-Bench-201 benchmark file")
    return NASBench201API(_NoCopyDict(data), verbose=False)


def api_record(api: NASBench201API, arch: Arch, source: str) -> Record:
    """``arch``'s accuracies as the API reports them: ``get_more_info(index, dataset, hp='200',
    is_random=False)`` (mean over trials), its ``valid-accuracy`` and ``test-accuracy``."""
    i = index(arch)
    acc = _empty_accuracy()
    if i in api.arch2infos_dict:
        for dataset in DATASETS:
            try:
                info = api.get_more_info(i, dataset, hp=EPOCHS, is_random=False)
            except KeyError:  # the file has no trial of this architecture on this dataset
                continue
            for m in METRICS:
                value = info.get(f"{m}-accuracy")
                acc[dataset][m] = None if value is None else float(value)
    return Record(i, all_archs()[i], acc, source)


def _is_table(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except FileNotFoundError:
        raise NB201Error(f"file not found: {path}") from None
    except OSError as exc:
        raise NB201Error(f"cannot read {path}: {exc.strerror or exc}") from None


def lookup(path: str | Path, archs: Sequence[Arch]) -> list[Record]:
    """The records of ``archs`` from a table (:meth:`Table.load`) or a trusted benchmark file
    (:func:`open_api`: slow, and GBs of memory, for the real one); ``archs`` are checked first."""
    path = Path(path)
    indexes = [index(a) for a in archs]
    if _is_table(path):
        table = Table.load(path)
        return [table.lookup(i) for i in indexes]
    api = open_api(path)
    return [api_record(api, i, path.name) for i in indexes]


def export_table(path: str | Path, out: str | Path) -> Table:
    """Read the trusted benchmark file at ``path`` (:func:`open_api`) and write its table to ``out``."""
    path = Path(path)
    table = Table.from_api(open_api(path), path.name)
    table.save(out)
    return table

"""NAS-Bench-201 names and look-ups (``topofx.nb201``, ``topofx nb201 ...``).

The index order is checked three ways: round trips over all 15625 architectures, xautodl's own
enumeration (``Structure.gen_all``) shuffled as the benchmark's generation script does, and entries
of the real benchmark file quoted by third-party code.  Look-ups run on a small synthetic benchmark
file in the API's format, built with the API's own result classes.
"""
from __future__ import annotations

import json
import random

import pytest

from topofx import nb201
from topofx.cli import main

API = pytest.importorskip("nas_201_api")
torch = pytest.importorskip("torch")

EXAMPLE = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
# (index, arch string) of the real benchmark file: 0, 9 and 123 as its generation script asserts
# them; the others are a list of eleven arch strings in third-party code (with 0's), which this order
# puts at 0, 1, 1999, 2999, ..., 9999 -- evidently read from the file by index
FILE_ENTRIES = {
    0: "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    1: EXAMPLE,
    9: "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|",
    123: "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|",
    1999: "|skip_connect~0|+|nor_conv_3x3~0|skip_connect~1|+|none~0|skip_connect~1|skip_connect~2|",
    2999: "|skip_connect~0|+|skip_connect~0|nor_conv_1x1~1|+|nor_conv_3x3~0|nor_conv_1x1~1|avg_pool_3x3~2|",
    3999: "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|none~0|skip_connect~1|avg_pool_3x3~2|",
    4999: "|skip_connect~0|+|nor_conv_1x1~0|none~1|+|nor_conv_3x3~0|none~1|none~2|",
    5999: "|none~0|+|skip_connect~0|nor_conv_3x3~1|+|avg_pool_3x3~0|nor_conv_3x3~1|none~2|",
    6999: "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
    7999: "|nor_conv_1x1~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|nor_conv_1x1~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    8999: "|none~0|+|avg_pool_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|skip_connect~1|none~2|",
    9999: "|skip_connect~0|+|nor_conv_3x3~0|none~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|",
}


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def test_round_trip_on_every_architecture():
    archs = nb201.all_archs()
    assert len(archs) == len(set(archs)) == nb201.NUM_ARCHS == 15625
    for i, s in enumerate(archs):
        assert nb201.index(s) == i
        assert nb201.arch_str(i) == s
        geno = nb201.genotype(s)
        assert nb201.arch_str(geno) == s
        assert nb201.index([list(node) for node in geno]) == i  # lists of lists of tuples too


def test_index_matches_the_benchmark_file():
    for i, s in FILE_ENTRIES.items():
        assert nb201.all_archs()[i] == s
        assert nb201.index(s) == i


def test_order_is_xautodls_enumeration_shuffled_as_the_benchmark():
    genotypes = pytest.importorskip("xautodl.models.cell_searchs.genotypes")
    from xautodl.models.cell_operations import SearchSpaceNames

    assert tuple(SearchSpaceNames["nas-bench-201"]) == nb201.OPS
    enumerated = genotypes.Structure.gen_all(list(nb201.OPS), 4, True)  # genotype lists: fast
    order = list(range(len(enumerated)))
    random.Random(88).shuffle(order)  # the generation script: random.seed(88); random.shuffle(archs)
    assert [nb201.ops(enumerated[c]) for c in order] == [nb201.ops(i) for i in range(nb201.NUM_ARCHS)]
    for s in nb201.all_archs()[::97]:
        structure = genotypes.Structure.str2structure(s)
        assert structure.tostr() == s
        assert nb201.arch_str(structure) == s
        assert [tuple(node) for node in structure.nodes] == nb201.genotype(s)


def test_genotype_is_the_apis_str2lists():
    for s in nb201.all_archs()[::101]:
        assert API.NASBench201API.str2lists(s) == nb201.genotype(s)


def test_genotype_of_an_xautodl_darts_supernet():
    pytest.importorskip("xautodl")
    from xautodl.models.cell_searchs import TinyNetworkDarts

    model = TinyNetworkDarts(4, 1, 4, 10, list(nb201.OPS), False, False)
    want = nb201.ops(EXAMPLE)
    with torch.no_grad():
        model.arch_parameters.zero_()
        for e, (node, source) in enumerate(nb201.EDGES):
            model.arch_parameters[model.edge2index[f"{node}<-{source}"], nb201.OPS.index(want[e])] = 1.0
    structure = model.genotype()
    assert nb201.arch_str(structure) == EXAMPLE
    assert nb201.index(structure) == 1


def test_edges_of_a_node_in_any_order_and_spaces():
    shuffled = "|nor_conv_3x3~0| + |avg_pool_3x3~1|nor_conv_3x3~0| + |skip_connect~2|skip_connect~0|nor_conv_3x3~1|"
    assert nb201.arch_str(shuffled) == EXAMPLE


@pytest.mark.parametrize("arch, message", [
    ("|nor_conv_3x3~0|+|none~0|none~1|", "has 2 node(s) separated by '+'; NAS-Bench-201 cells have 3"),
    ("|conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",
     "unknown op 'conv_3x3' on edge 1<-0 of the arch string '|conv_3x3~0|"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|",
     "node 2 of the arch string '|none~0|+|none~0|+|none~0|none~1|none~2|' has 1 edge(s) from node(s) [0]; "
     "it needs 2, one from each of node(s) 0, 1"),
    ("|none~0|+|none~0|none~0|+|none~0|none~1|none~2|", "has 2 edge(s) from node(s) [0, 0]; it needs 2"),
    ("|none~0|+|none~0|none~1|+|none~0|none~1|none~3|", "node 3 of the arch string"),
    ("|none|+|none~0|none~1|+|none~0|none~1|none~2|", "bad edge 'none' in node 1"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "node 1 of arch string"),
    (15625, "index 15625 is out of range: NAS-Bench-201 indexes are 0..15624"),
    (-1, "index -1 is out of range: NAS-Bench-201 indexes are 0..15624"),
    (True, "cannot read a NAS-Bench-201 architecture from a bool"),
    (1.0, "cannot read a NAS-Bench-201 architecture from a float"),
    ([[("none", 0)]], "the genotype has 1 node(s); NAS-Bench-201 cells have 3"),
    ([[("none", 0)], [("none", 0), ("none", 1)], [("none", 0), ("none", 2)]],
     "node 3 of the genotype has 2 edge(s) from node(s) [0, 2]; it needs 3"),
    ([[("nor_conv_5x5", 0)], [("none", 0), ("none", 1)], [("none", 0), ("none", 1), ("none", 2)]],
     "unknown op 'nor_conv_5x5' on edge 1<-0 of the genotype; NAS-Bench-201's ops are none, skip_connect, "
     "nor_conv_1x1, nor_conv_3x3, avg_pool_3x3"),
    ([[("none",)], [], []], "bad edge ('none',) in node 1 of the genotype"),
    ([["none~0"], [], []], "bad edge 'none~0' in node 1 of the genotype"),
])
def test_errors_say_what_is_wrong_and_what_is_valid(arch, message):
    with pytest.raises(nb201.NB201Error) as info:
        nb201.index(arch)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------
# a synthetic benchmark file in the API's format
# ---------------------------------------------------------------------------------------------
EVAL_SETS = {"cifar10-valid": ("x-valid", "ori-test"), "cifar10": ("ori-test",),
             "cifar100": ("x-valid", "x-test", "ori-test"), "ImageNet16-120": ("x-valid", "x-test", "ori-test")}
SEEDS = (777, 888)
FULL = {0: nb201.DATASETS, 1: nb201.DATASETS, 9999: nb201.DATASETS, 123: ("cifar10-valid", "cifar10", "cifar100")}
NOT_EVALUATED = 5


def _final(index: int, dataset: str, setname: str, seed: int, epochs: int) -> float:
    """The accuracy a trial ends with; 12-epoch runs are far off, so reading them is caught."""
    base = 50.0 + (index % 7) + nb201.DATASETS.index(dataset) + 0.5 * ("test" in setname)
    return base + (seed - 800) / 100 - (30.0 if epochs == 12 else 0.0)


def _expected(index: int, dataset: str, metric: str) -> float | None:
    setname = {"valid": "x-valid", "test": "ori-test" if dataset.startswith("cifar10") else "x-test"}[metric]
    if dataset not in FULL.get(index, ()) or setname not in EVAL_SETS[dataset]:
        return None
    return sum(_final(index, dataset, setname, seed, 200) for seed in SEEDS) / len(SEEDS)


def _arch_results(index: int, datasets, epochs: int) -> dict:
    results = API.ArchResults(index, nb201.arch_str(index))
    for dataset in datasets:
        for seed in SEEDS:
            final = {name: _final(index, dataset, name, seed, epochs) for name in EVAL_SETS[dataset]}
            curve = lambda last: {e: last - (epochs - 1 - e) * 0.1 for e in range(epochs)}  # noqa: E731
            trial = API.ResultsCount(dataset, None, curve(99.0), curve(0.01), 1.0, 100.0,
                                     {"name": "infer.tiny", "channel": 16, "num_cells": 5,
                                      "arch_str": nb201.arch_str(index), "class_num": 10},
                                     seed, epochs, [0.01])
            accs, losses, times = {}, {}, {}
            for name, last in final.items():
                for e, acc in curve(last).items():
                    accs[f"{name}@{e}"], losses[f"{name}@{e}"], times[f"{name}@{e}"] = acc, 1.0, 0.1
            trial.update_eval(accs, losses, times)
            results.update(dataset, seed, trial)
    return results.state_dict()


def _benchmark_dict(meta_archs=None) -> dict:
    return {
        "meta_archs": list(nb201.all_archs()) if meta_archs is None else meta_archs,
        "total_archs": nb201.NUM_ARCHS,
        "arch2infos": {i: {"less": _arch_results(i, ("cifar10-valid",), 12), "full": _arch_results(i, ds, 200)}
                       for i, ds in FULL.items()},
        "evaluated_indexes": set(FULL),
    }


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb201") / "NAS-Bench-201-tiny.pth"
    torch.save(_benchmark_dict(), path)
    return path


@pytest.fixture(scope="module")
def table_file(bench_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb201_table") / "table.json"
    nb201.export_table(bench_file, out)
    return out


def _check_record(record: nb201.Record, i: int) -> None:
    assert record.index == i and record.arch == nb201.all_archs()[i]
    for dataset in nb201.DATASETS:
        for metric in nb201.METRICS:
            want = _expected(i, dataset, metric)
            got = record.accuracy[dataset][metric]
            assert got == pytest.approx(want) if want is not None else got is None, (dataset, metric)


def test_api_record_reports_the_apis_200_epoch_mean(bench_file):
    api = nb201.open_api(bench_file)
    assert len(api) == nb201.NUM_ARCHS
    for i in (*FULL, NOT_EVALUATED):
        record = nb201.api_record(api, nb201.all_archs()[i], bench_file.name)
        _check_record(record, i)
        assert record.evaluated == (i in FULL)
    assert api.get_more_info(1, "cifar100", hp="200", is_random=False)["test-accuracy"] == \
        pytest.approx(_expected(1, "cifar100", "test"))


def test_table_export_and_lookup_by_every_name(table_file):
    assert table_file.stat().st_size < 4e6
    data = json.loads(table_file.read_text())
    assert data["archs"] == list(nb201.all_archs()) and data["epochs"] == 200
    table = nb201.Table.load(table_file)
    assert len(table) == nb201.NUM_ARCHS and table.evaluated == len(FULL)
    assert table.source == "NAS-Bench-201-tiny.pth"
    for i in FULL:
        s = nb201.all_archs()[i]
        for name in (i, s, nb201.genotype(s), [list(node) for node in nb201.genotype(s)]):
            _check_record(table.lookup(name), i)
    assert table.accuracy(EXAMPLE, "cifar10") == pytest.approx(_expected(1, "cifar10", "test"))
    assert table.accuracy(EXAMPLE, "cifar10", "valid") is None
    assert table.accuracy(NOT_EVALUATED, "cifar100", "valid") is None
    assert "not evaluated in NAS-Bench-201-tiny.pth" in table.lookup(NOT_EVALUATED).format()
    with pytest.raises(nb201.NB201Error, match="unknown dataset 'cifar-10'; NAS-Bench-201's are cifar10-valid"):
        table.accuracy(0, "cifar-10")
    with pytest.raises(nb201.NB201Error, match="unknown metric 'train'; use one of valid, test"):
        table.accuracy(0, "cifar10", "train")


def test_lookup_reads_a_table_or_a_benchmark_file(bench_file, table_file):
    from_table = nb201.lookup(table_file, [EXAMPLE, 123])
    from_file = nb201.lookup(bench_file, [EXAMPLE, 123])
    assert [r.accuracy for r in from_table] == [r.accuracy for r in from_file]
    _check_record(from_table[1], 123)
    text = from_table[0].format()
    assert f"NAS-Bench-201 index 1: {EXAMPLE}" in text
    assert "cifar10                -" in text  # no validation split on cifar10


def test_bad_files(tmp_path, bench_file):
    with pytest.raises(nb201.NB201Error, match="file not found"):
        nb201.lookup(tmp_path / "missing.pth", [0])
    with pytest.raises(nb201.NB201Error, match="index 15625 is out of range"):  # checked before loading
        nb201.lookup(tmp_path / "missing.pth", [15625])
    torch.save({"meta_archs": []}, tmp_path / "other.pth")
    with pytest.raises(nb201.NB201Error, match="not a NAS-Bench-201 benchmark file: it needs meta_archs, arch2infos"):
        nb201.open_api(tmp_path / "other.pth")
    swapped = list(nb201.all_archs())
    swapped[3], swapped[4] = swapped[4], swapped[3]
    torch.save({"meta_archs": swapped, "arch2infos": {}, "evaluated_indexes": set()}, tmp_path / "swapped.pth")
    with pytest.raises(nb201.NB201Error, match=r"architecture 3 is .*, NAS-Bench-201's is"):
        nb201.open_api(tmp_path / "swapped.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a pickle")
    with pytest.raises(nb201.NB201Error, match="cannot load .* as a NAS-Bench-201 benchmark file"):
        nb201.open_api(tmp_path / "garbage.pth")
    (tmp_path / "t.json").write_text('{"format": "something else"}')
    with pytest.raises(nb201.NB201Error, match="not a NAS-Bench-201 table written by topofx nb201 export"):
        nb201.Table.load(tmp_path / "t.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(nb201.NB201Error, match="cannot read .* as a NAS-Bench-201 table"):
        nb201.Table.load(tmp_path / "t.json")
    with pytest.raises(nb201.NB201Error, match="cannot write the table to"):
        nb201.export_table(bench_file, tmp_path / "no" / "dir" / "t.json")


# ---------------------------------------------------------------------------------------------
# command line (topofx nb201 ...)
# ---------------------------------------------------------------------------------------------
def test_cli_arch(capsys):
    assert main(["nb201", "arch", EXAMPLE, "9999"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"1  {EXAMPLE}", f"9999  {FILE_ENTRIES[9999]}"]


def test_cli_export_and_lookup(bench_file, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["nb201", "export", "--file", str(bench_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (") and f"{len(FULL)} of 15625 architectures evaluated" in printed
    assert nb201.Table.load(out).evaluated == len(FULL)
    assert main(["nb201", "lookup", "--file", str(out), "--json", "1", FILE_ENTRIES[9999]]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in records] == [1, 9999]
    assert records[0]["accuracy"]["cifar100"]["test"] == pytest.approx(_expected(1, "cifar100", "test"))
    assert main(["nb201", "lookup", "--file", str(bench_file), EXAMPLE]) == 0
    text = capsys.readouterr().out
    assert f"NAS-Bench-201 index 1: {EXAMPLE}" in text and "mean over trials" in text


@pytest.mark.parametrize("argv, message", [
    (["nb201", "arch", "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "unknown op 'conv' on edge 1<-0"),
    (["nb201", "arch", "15625"], "index 15625 is out of range: NAS-Bench-201 indexes are 0..15624"),
    (["nb201", "lookup", "--file", "missing.json", "0"], "file not found: missing.json"),
    (["nb201"], "give an nb201 command: arch, lookup or export"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("topofx: error: ") and message in err


def test_cli_help_says_to_trust_the_benchmark_file(capsys):
    for command in ("lookup", "export"):
        assert main(["nb201", command, "--help"]) == 0
        assert "trusted source" in " ".join(capsys.readouterr().out.split())

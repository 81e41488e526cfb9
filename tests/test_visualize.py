"""Before/after pictures (topofx.visualize): clusters per cell / edge / candidate, colours, legend,
cell selection, and the path without Graphviz's ``dot`` program."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx import zoo
from topofx.visualize import ACTION_COLORS, visualize

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` program not installed")


@pytest.fixture(scope="module")
def nb201():
    """A tiny NAS-Bench-201 DARTS supernet (C=4, N=1: three searchable cells), exact-simplified."""
    model, inputs = zoo.build("nb201-darts", C=4, N=1, batch_size=2, image_size=16)
    return topofx.simplify(model, inputs, mode="exact"), inputs


class Mixed(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)),
            nn.AvgPool2d(3, 1, 1),
        ])

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class TwoEdges(nn.Module):
    """Two mixed edges out of one node, no cell structure."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.a, self.b = Mixed(c), Mixed(c)
        self.alpha = nn.Parameter(1e-3 * torch.randn(2, 3))

    def forward(self, x):
        w = F.softmax(self.alpha, -1)
        return self.a(x, w[0]) + self.b(x, w[1])


def _dot(paths, which):
    return paths[f"{which}.dot"].read_text()


def test_dot_sources_group_cells_edges_candidates(nb201, tmp_path):
    simplified, inputs = nb201
    paths = visualize(simplified, tmp_path, "svg", example_inputs=inputs)
    before, after = _dot(paths, "before"), _dot(paths, "after")
    # the first cell with mixed edges, its six edges, and each edge's five candidates side by side
    assert "cluster_cell_cells.0" in before and "cluster_cell_cells.2" not in before
    assert len(set(re.findall(r"cluster_edge_\d+", before))) == 6
    assert len(set(re.findall(r"cluster_cand_\d+_\d+", before))) == 30
    assert "cluster_cell_cells.0" in after and "cluster_edge_" in after
    # primitives, shapes and architecture-weighted products are labelled
    for label in ("Conv2d 3x3", "Conv2d 1x1", "BatchNorm2d", "ReLU", "AvgPool2d 3x3", "mul·w", "add"):
        assert label in before, label
    assert "2x4x16x16" in before
    assert "FusedConv2d" in after and "slice ch" in after
    # rewritten nodes are coloured by action; dead nodes dashed; legend present in both
    for action in ("removed", "shared", "fused"):
        assert ACTION_COLORS[action] in before, action
        assert ACTION_COLORS[action] in after, action
    assert "dashed" in before and "gone: dead after a rewrite" in before
    assert "cluster_legend" in before and "cluster_legend" in after
    assert "shared: computed once, used by all" in after


@needs_dot
def test_svg_rendered_with_clusters_and_legend(nb201, tmp_path):
    simplified, inputs = nb201
    paths = visualize(simplified, tmp_path / "pics", example_inputs=inputs)
    assert set(paths) == {"before.svg", "after.svg", "before.dot", "after.dot"}
    svg = paths["before.svg"].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert 'class="cluster"' in svg and "cell cells.0" in svg and "edge edges.1&lt;&#45;0" in svg
    assert ACTION_COLORS["shared"] in svg and "legend" in svg
    assert ACTION_COLORS["fused"] in paths["after.svg"].read_text()
    lines = paths.summary().splitlines()
    assert len(lines) == 4 and all(str(tmp_path) in line for line in lines)


@needs_dot
def test_png(nb201, tmp_path):
    simplified, inputs = nb201
    paths = visualize(simplified, tmp_path, fmt="png", example_inputs=inputs)
    assert paths["after.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cell_selection(nb201, tmp_path):
    simplified, inputs = nb201
    one = visualize(simplified, tmp_path / "one", cell="cells.2", example_inputs=inputs)
    text = _dot(one, "before")
    assert "cluster_cell_cells.2" in text and "cluster_cell_cells.0" not in text
    assert "from__" in text and "to__next" in text  # the cell's inputs and where its result goes
    everything = visualize(simplified, tmp_path / "all", cell="all", example_inputs=inputs)
    text = _dot(everything, "before")
    assert "cluster_cell_cells.0" in text and "collapsed__cells.2" in text and "collapsed__cells.4" in text
    assert "Linear" in text  # the head is drawn too
    full = visualize(simplified, tmp_path / "full", cell="all", collapse_repeated=False, example_inputs=inputs)
    assert "cluster_cell_cells.4" in _dot(full, "after")
    with pytest.raises(ValueError, match="cells.0, cells.2, cells.4"):
        visualize(simplified, tmp_path / "bad", cell="cells.9", example_inputs=inputs)


def test_inputs_default_to_the_simplified_module(nb201, tmp_path):
    simplified, _ = nb201
    paths = visualize(simplified, tmp_path)  # simplified.example_inputs, or the graph's input shapes
    assert "cluster_cell_cells.0" in _dot(paths, "before")


def test_missing_dot_writes_dot_files_and_one_line(nb201, tmp_path, monkeypatch, capsys):
    simplified, inputs = nb201
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    paths = visualize(simplified, tmp_path, "svg", example_inputs=inputs)
    assert set(paths) == {"before.dot", "after.dot"}
    assert not (tmp_path / "before.svg").exists()
    assert paths["before.dot"].read_text().startswith("digraph")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install graphviz" in err[0]
    assert len(paths.summary().splitlines()) == 2


def test_network_without_cells_gets_edge_clusters(tmp_path):
    torch.manual_seed(0)
    model, x = TwoEdges(), torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact")
    paths = visualize(simplified, tmp_path, example_inputs=(x,))
    before = _dot(paths, "before")
    assert len(set(re.findall(r"cluster_edge_\d+", before))) == 2
    assert "input x" in before and "output" in before


class _BranchesOnData(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.relu() if y.sum() > 0 else -y  # a Python branch on the data: no graph can hold it


def test_uncapturable_model_draws_a_note(tmp_path):
    model, inputs = _BranchesOnData(), (torch.randn(2, 3, 8, 8),)
    with pytest.warns(UserWarning):
        simplified = topofx.simplify(model, inputs)
    assert simplified.graph_module is None
    paths = visualize(simplified, tmp_path, example_inputs=inputs)
    assert "could not capture" in _dot(paths, "before") or "eager" in _dot(paths, "after")


def test_bad_format(nb201, tmp_path):
    simplified, inputs = nb201
    with pytest.raises(ValueError, match="format"):
        visualize(simplified, tmp_path, fmt="docx", example_inputs=inputs)


def test_sampled_supernet_before_is_the_relaxed_forward(tmp_path):
    """GDAS through its adapter: the before picture is the graph simplify rewrote (the relaxed forward,
    every candidate gated), so rewritten nodes are highlighted on both sides."""
    model, (x,) = zoo.build("nb201-gdas", C=4, N=1, batch_size=2, image_size=8)
    simplified = topofx.simplify(model, x)
    paths = visualize(simplified, tmp_path)
    before, after = _dot(paths, "before"), _dot(paths, "after")
    assert "gate" in before and "gate" in after
    assert before.count("->") > after.count("->")

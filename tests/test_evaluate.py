"""``topofx.evaluate``: a searched genotype as a freshly initialized child network, retrained.

The one-hot architecture is checked with xautodl's own ``genotype()`` reading it back (an
independent reading of which operation each edge carries), the child against that supernet's
train-mode forward, and the retraining by its loss falling and its test accuracy beating chance.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from topofx import data, evaluate, nb201
from topofx.search import logits_of

DARTS_GENOTYPE = {
    "normal": [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 1),
               ("skip_connect", 0), ("sep_conv_5x5", 2), ("max_pool_3x3", 0), ("dil_conv_5x5", 3)],
    "reduce": [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("avg_pool_3x3", 1),
               ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("sep_conv_3x3", 4)],
}
XAUTODL_NAMES = {"sep_conv_3x3": "dua_sepc_3x3", "sep_conv_5x5": "dua_sepc_5x5",
                 "dil_conv_3x3": "dil_sepc_3x3", "dil_conv_5x5": "dil_sepc_5x5"}


@pytest.mark.parametrize("arch", random.Random(7).sample(nb201.all_archs(), 12))
def test_nb201_one_hot_reads_back(arch):
    model, _ = evaluate.one_hot_supernet(arch, "nb201", C=4, N=1)
    assert model.genotype().tostr() == arch


def test_darts_one_hot_reads_back():
    model, _ = evaluate.one_hot_supernet(DARTS_GENOTYPE, "darts", C=4, N=1)
    got = model.genotype()
    for cell in ("normal", "reduce"):
        want = [(XAUTODL_NAMES.get(op, op), j) for op, j in DARTS_GENOTYPE[cell]]
        assert sorted((op, j) for node in got[cell] for op, j, _ in node) == sorted(want)


@pytest.mark.parametrize("space,genotype", [
    ("nb201", "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"),
    ("darts", DARTS_GENOTYPE),
])
def test_child_computes_the_one_hot_supernet(space, genotype):
    model, x = evaluate.one_hot_supernet(genotype, space, C=4, N=1, image_size=8, seed=3)
    child = evaluate.child_network(genotype, space, C=4, N=1, image_size=8, seed=3)
    x = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(child(x)), logits_of(model(x)), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in child.parameters()) < sum(p.numel() for p in model.parameters())


def test_genotype_errors_name_the_problem():
    with pytest.raises(ValueError, match="two operations on one edge"):
        evaluate.child_network({"normal": [("skip_connect", 0), ("sep_conv_3x3", 0)] * 4,
                                "reduce": DARTS_GENOTYPE["reduce"]}, "darts", C=4, N=1)
    with pytest.raises(ValueError, match="names operation 'conv_7x7'"):
        evaluate.child_network({"normal": [("conv_7x7", 0), ("sep_conv_3x3", 1)] * 4,
                                "reduce": DARTS_GENOTYPE["reduce"]}, "darts", C=4, N=1)
    with pytest.raises(ValueError, match="unknown space"):
        evaluate.child_network("|skip_connect~0|", "nas101")


def test_retrain_learns_digits():
    child = evaluate.child_network(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
        "nb201", C=4, N=1, image_size=8)
    result = evaluate.retrain(child, data.load("digits", image_size=8), epochs=2, progress=False)
    first, last = sum(result.train_loss[:5]) / 5, sum(result.train_loss[-5:]) / 5
    assert last < 0.7 * first
    assert result.test_acc > 0.5  # ten classes: chance is 0.1


def test_derive_and_evaluate_commands(tmp_path, capsys):
    from topofx.cli import main
    from topofx.evaluate import load_child
    from topofx.searching import load_search

    run = tmp_path / "run"
    assert main(["search", "--algo", "darts-v1", "--space", "nb201", "--data", "digits", "--batch-size", "16",
                 "--image-size", "8", "--channels", "4", "--cells", "1", "--max-steps", "2", "--epochs", "1",
                 "--no-progress", "--threads", "1", "--out", str(run)]) == 0
    assert main(["derive", str(run), "--out", str(tmp_path / "child.pt")]) == 0
    assert "weights inherited from the searched supernet" in capsys.readouterr().out
    child, (model, _, _) = load_child(tmp_path / "child.pt"), load_search(run)
    searched = model.state_dict()
    assert child.state_dict().keys() <= searched.keys()
    for key, value in child.state_dict().items():
        assert torch.equal(value, searched[key]), key
    assert (tmp_path / "child.py").read_text().startswith("\n\n\ndef forward")

    arch = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    assert main(["evaluate", arch, "--channels", "4", "--image-size", "8", "--epochs", "1", "--seeds", "0,1",
                 "--threads", "1", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["genotype"] == arch and len(result["test_acc"]) == 2 and result["mean"] > 0.2
    assert main(["derive", arch, "--space", "darts"]) == 2
    assert "the genotype is of the nb201 space" in capsys.readouterr().err

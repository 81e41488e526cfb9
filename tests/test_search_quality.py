"""A short first-order DARTS search on real data (scikit-learn's digits, shipped with the package):
the original supernet and its topo-mode simplification, from the same seed, both learn, and the
topo run's validation accuracy stays within a stated margin of the original's."""
from __future__ import annotations


import topofx
from topofx import zoo
from topofx.search import darts_search, digits

STEPS = 40
MARGIN = 0.15  # absolute validation accuracy (fraction) the topo search may trail the original by


def _run(simplify: bool):
    train, val = digits(16)
    model, _ = zoo.build("nb201-darts", C=8, N=1, batch_size=32, image_size=16, seed=0)
    net = topofx.simplify(model, (train[0][:32],), mode="topo") if simplify else model
    history = darts_search(net, train, val, steps=STEPS, batch_size=32, a_lr=3e-3, progress=False, seed=0)
    return net, history


def _mean(xs):
    return sum(xs) / len(xs)


def test_topo_search_on_digits_tracks_the_original():
    _, original = _run(simplify=False)
    simplified, topo = _run(simplify=True)
    assert simplified.report.mode == "topo" and simplified.report.approximate
    for history in (original, topo):
        assert _mean(history.train_loss[:5]) > _mean(history.train_loss[-5:])  # the loss decreases
        assert _mean(history.val_loss[:5]) > _mean(history.val_loss[-5:])
    acc_original, acc_topo = _mean(original.val_acc[-10:]), _mean(topo.val_acc[-10:])
    assert acc_original > 0.3, "the original search itself must learn something on digits"
    assert acc_topo >= acc_original - MARGIN, (acc_topo, acc_original)

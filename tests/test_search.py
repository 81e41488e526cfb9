"""The first-order DARTS loop (topofx.search) on a simplified supernet: both optimizers act on the
original's parameters, and the derived genotype reads the learned alphas."""
from __future__ import annotations

import re

import pytest
import torch

import topofx
from topofx import zoo
from topofx.search import arch_parameters, darts_search, logits_of


def test_darts_search_updates_weights_and_alphas_of_the_original():
    model, inputs = zoo.build("nb201-darts", C=4, N=1, batch_size=8, image_size=8)
    simplified = topofx.simplify(model, inputs, mode="exact")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    alphas = arch_parameters(simplified)
    assert [id(a) for a in alphas] == [id(model.arch_parameters)]
    alpha0 = model.arch_parameters.detach().clone()
    conv0 = model.stem[0].weight.detach().clone()

    history = darts_search(simplified, (x[:16], y[:16]), (x[16:], y[16:]), steps=3, batch_size=8,
                           a_lr=0.05, progress=False)

    assert history.steps == 3 and len(history.val_loss) == 3 and history.seconds > 0
    assert all(torch.isfinite(torch.tensor(history.train_loss + history.val_loss)))
    assert not torch.equal(model.arch_parameters.detach(), alpha0)
    assert not torch.equal(model.stem[0].weight.detach(), conv0)
    assert model.arch_parameters.grad is None  # no stale gradient left behind
    genotype = simplified.genotype().tostr()
    assert re.fullmatch(r"(\|[a-z_0-9x]+~\d\|)(\+(\|[a-z_0-9x]+~\d)+\|)+", genotype), genotype
    assert "steps" in history.summary()


def test_data_loader_input_and_errors():
    model, inputs = zoo.build("nb201-darts", C=4, N=1, batch_size=4, image_size=8)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    history = darts_search(model, batches, batches, steps=3, progress=False)  # cycles through the list
    assert history.steps == 3
    with pytest.raises(ValueError, match="steps"):
        darts_search(model, batches, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="architecture parameters"):
        darts_search(torch.nn.Linear(2, 2), batches, batches, steps=1, progress=False)
    assert logits_of((torch.zeros(1), torch.ones(2, 3))).shape == (2, 3)

"""msi.models.bpr: scores and the loss against a hand computation, gradients, negatives, eval-mode determinism and
a pinned 3-epoch trajectory on the tiny set."""

from __future__ import annotations

import math

import pytest
import torch

from msi.config import load_config
from msi.models import build_model
from msi.models.bpr import BPR
from tests.conftest import assert_trajectory, pinned_rows


def _hand_model() -> BPR:
    """2 users, 3 items, d = 2, every weight set by hand."""
    model = BPR(2, 3, torch.tensor([[0, 1], [1, 0]]), embedding_dim=2, gamma=0.25)
    with torch.no_grad():
        model.user.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        model.item.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
    return model


def test_scores_are_inner_products():
    scores = _hand_model().eval().score(torch.tensor([0, 1]))
    torch.testing.assert_close(scores, torch.tensor([[3.0, 3.0, 4.0], [0.0, -1.0, -2.0]]))


def test_loss_is_bpr_plus_mmrecs_frobenius_regulariser(monkeypatch):
    """Pairs (0, 1) and (1, 0), negatives 2 and 2: score differences 3 - 4 = -1 and 0 - (-2) = 2; the user rows
    have norm sqrt(5 + 1), the positives sqrt(2 + 9), the negatives sqrt(4 + 4), over B = 2."""
    model = _hand_model()
    monkeypatch.setattr(model, "sample_negatives", lambda users: torch.tensor([2, 2]))
    terms = {k: v.detach() for k, v in model.loss(torch.tensor([0, 1]), torch.tensor([1, 0])).items()}
    bpr = (math.log(1 + math.exp(1)) + math.log(1 + math.exp(-2))) / 2
    reg = (math.sqrt(6) + math.sqrt(11) + math.sqrt(8)) / 2
    assert float(terms["bpr"]) == pytest.approx(bpr, rel=1e-6)
    assert float(terms["reg"]) == pytest.approx(reg, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(bpr + 0.25 * reg, rel=1e-6)


def test_gradients_reach_the_batch_rows_only(monkeypatch):
    model = _hand_model()
    monkeypatch.setattr(model, "sample_negatives", lambda users: torch.tensor([2]))
    model.loss(torch.tensor([0]), torch.tensor([1]))["loss"].backward()
    assert model.user.grad[1].abs().sum() == 0 and model.user.grad[0].abs().sum() > 0
    assert model.item.grad[0].abs().sum() == 0 and model.item.grad[1:].abs().sum(1).gt(0).all()


def test_negatives_avoid_train_items_and_eval_is_deterministic(tiny):
    model = _tiny_bpr(tiny)
    users = torch.from_numpy(tiny.train[:, 0]).repeat(20)
    neg = model.sample_negatives(users)
    train = {(int(u), int(i)) for u, i in tiny.train}
    assert not any((int(u), int(i)) in train for u, i in zip(users, neg))
    model.eval()
    first, second = model.embeddings(), model.embeddings()
    assert set(first) == {"user", *model.item_views}
    assert all(torch.equal(first[k], second[k]) for k in first)


def _tiny_bpr(tiny) -> BPR:
    torch.manual_seed(0)
    return BPR(tiny.n_users, tiny.n_items, tiny.train, embedding_dim=8, gamma=2.0)


# 3 epochs on the tiny set (batch 64, seeds as in the test), recorded from this implementation
REFERENCE_LOSSES = [
    {"bpr": 0.6956948041915894, "reg": 0.2229953110218048, "loss": 1.1416854858398438},
    {"bpr": 0.689684271812439, "reg": 0.177208811044693, "loss": 1.0441019535064697},
    {"bpr": 0.6890873908996582, "reg": 0.14048928022384644, "loss": 0.9700659513473511},
]


def test_pinned_trajectory(tiny):
    assert_trajectory(pinned_rows(_tiny_bpr(tiny), tiny, 1e-2), REFERENCE_LOSSES)


def test_the_builder_reads_its_keys(tiny):
    model = build_model(load_config(overrides=["model.name=bpr", "model.embedding_dim=5", "loss.gamma=0.25"]), tiny)
    assert isinstance(model, BPR) and model.gamma == 0.25
    assert model.user.shape == (tiny.n_users, 5) and model.item.shape == (tiny.n_items, 5)

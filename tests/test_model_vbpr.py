"""msi.models.vbpr: the visual term theta_u^T (E f_i + b) and the loss against hand computations, gradients,
negatives, eval-mode determinism and a pinned 3-epoch trajectory on the tiny set."""

from __future__ import annotations

import math

import pytest
import torch

from msi.config import load_config
from msi.models import build_model
from msi.models.vbpr import VBPR
from tests.conftest import assert_trajectory, pinned_rows


def _hand_model() -> VBPR:
    """2 users, 3 items, d = 1, d' = 2, features of two modalities (F = 2 + 1), every weight set by hand."""
    feats = {"image": torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.0, 0.0]]), "audio": torch.tensor([[1.0], [3.0], [0.0]])}
    model = VBPR(2, 3, torch.tensor([[0, 1], [1, 0]]), feats, embedding_dim=1, feature_dim=2, gamma=0.5)
    with torch.no_grad():
        model.user.copy_(torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 1.0]]))  # [gamma_u ; theta_u]
        model.item.copy_(torch.tensor([[0.0], [-1.0], [1.0]]))  # gamma_i
        model.proj.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))  # E (d', F)
        model.proj.bias.copy_(torch.tensor([0.5, -0.5]))  # b
    return model


def test_the_visual_term_is_theta_u_times_e_f_i():
    """f_1 = [1, 2 | 3] (image | audio): E f_1 + b = [1 + 3 + 0.5, 2 - 3 - 0.5] = [4.5, -1.5]; theta_0 = [2, 1]
    gives the visual term 9 - 1.5 = 7.5, and gamma_0 gamma_1 = 3 * -1 = -3: s(0, 1) = 4.5."""
    model = _hand_model().eval()
    torch.testing.assert_close(model.item_rows(torch.tensor([1])), torch.tensor([[-1.0, 4.5, -1.5]]))
    scores = model.score(torch.tensor([0, 1]))
    # f_0 = [0, 1 | 1]: E f_0 + b = [1.5, -0.5]; f_2 = 0: [0.5, -0.5]
    want = torch.tensor([[0.0 + 3.0 - 0.5, -3.0 + 7.5, 3.0 + 1.0 - 0.5], [0.0 + 1.5 - 0.5, 0.0 + 4.5 - 1.5, 0.0]])
    torch.testing.assert_close(scores, want)
    assert model.embeddings()["id"].shape == (3, 3) and model.embeddings()["user"].shape == (2, 3)


def test_loss_is_bpr_plus_mmrecs_frobenius_regulariser(monkeypatch):
    """User 0, positive 1 (s = 4.5), negative 2 (s = 3 + 1 - 0.5 = 3.5): BPR = log(1 + e^-1); the rows
    [3, 2, 1], [-1, 4.5, -1.5], [1, 0.5, -0.5] have norms sqrt(14), sqrt(23.5), sqrt(1.5), over B = 1."""
    model = _hand_model()
    monkeypatch.setattr(model, "sample_negatives", lambda users: torch.tensor([2]))
    terms = {k: v.detach() for k, v in model.loss(torch.tensor([0]), torch.tensor([1])).items()}
    reg = math.sqrt(14) + math.sqrt(23.5) + math.sqrt(1.5)
    assert float(terms["bpr"]) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert float(terms["reg"]) == pytest.approx(reg, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(math.log(1 + math.exp(-1)) + 0.5 * reg, rel=1e-6)


def test_gradients_reach_the_batch_rows_and_the_projection_only(monkeypatch):
    model = _hand_model()
    monkeypatch.setattr(model, "sample_negatives", lambda users: torch.tensor([2]))
    model.loss(torch.tensor([0]), torch.tensor([1]))["loss"].backward()
    assert model.user.grad[1].abs().sum() == 0 and model.user.grad[0].abs().sum() > 0
    assert model.item.grad[0].abs().sum() == 0 and model.item.grad[1:].abs().sum() > 0
    assert model.proj.weight.grad.abs().sum() > 0 and model.proj.bias.grad.abs().sum() > 0
    assert not model.features.requires_grad and "features" not in model.state_dict()


def test_negatives_avoid_train_items_and_eval_is_deterministic(tiny):
    model = _tiny_vbpr(tiny)
    users = torch.from_numpy(tiny.train[:, 0]).repeat(20)
    neg = model.sample_negatives(users)
    train = {(int(u), int(i)) for u, i in tiny.train}
    assert not any((int(u), int(i)) in train for u, i in zip(users, neg))
    model.eval()
    first, second = model.embeddings(), model.embeddings()
    assert set(first) == {"user", *model.item_views}
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_features_of_every_modality_are_read(tiny):
    model = _tiny_vbpr(tiny)
    assert model.proj.in_features == sum(f.shape[1] for f in tiny.features.values())
    with pytest.raises(ValueError, match="at least one modality"):
        VBPR(2, 3, torch.tensor([[0, 1]]), {})


def _tiny_vbpr(tiny) -> VBPR:
    torch.manual_seed(0)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    return VBPR(tiny.n_users, tiny.n_items, tiny.train, feats, embedding_dim=8, feature_dim=8, gamma=2.0)


# 3 epochs on the tiny set (batch 64, seeds as in the test), recorded from this implementation
REFERENCE_LOSSES = [
    {"bpr": 0.9111309051513672, "reg": 1.519747018814087, "loss": 3.950624942779541},
    {"bpr": 0.7415674924850464, "reg": 0.9397228956222534, "loss": 2.621013641357422},
    {"bpr": 0.6924882531166077, "reg": 0.6998857259750366, "loss": 2.0922598838806152},
]


def test_pinned_trajectory(tiny):
    assert_trajectory(pinned_rows(_tiny_vbpr(tiny), tiny, 1e-2), REFERENCE_LOSSES)


def test_the_builder_reads_its_keys(tiny):
    cfg = load_config(overrides=["model.name=vbpr", "model.embedding_dim=5", "model.feature_dim=3", "loss.gamma=0.25"])
    model = build_model(cfg, tiny)
    assert isinstance(model, VBPR) and model.gamma == 0.25
    assert model.user.shape == (tiny.n_users, 8) and model.item.shape == (tiny.n_items, 5)
    assert model.proj.out_features == 3
    want = torch.cat([torch.from_numpy(tiny.features[m]) for m in tiny.features], dim=1)
    assert torch.equal(model.features, want)

"""BUIR: the momentum update and the symmetric loss by hand, the update's place between optimizer steps, the score,
gradients, the builder, a pinned trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msi.config import load_config
from msi.data.graph import normalized_adjacency
from msi.models import build_model, grad_norms
from msi.models.buir import BUIR
from msi.train import make_optimizer, run_epoch

TRAIN = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [2, 0]])  # 3 users, 3 items


def _model(**kw) -> BUIR:
    torch.manual_seed(0)
    return BUIR(3, 3, normalized_adjacency(TRAIN, 3, 3), embedding_dim=2, n_layers=1, **kw)


def test_momentum_update_by_hand() -> None:
    model = _model(momentum=0.75)
    with torch.no_grad():
        model.target_emb.copy_(torch.arange(12.0).view(6, 2))
        model.emb.copy_(torch.full((6, 2), 4.0))
    model.update_target()
    want = 0.75 * torch.arange(12.0).view(6, 2) + 0.25 * 4.0  # e.g. row 0: (0, 0.75) + 1
    torch.testing.assert_close(model.target_emb, want)
    assert model.target_emb[0].tolist() == [1.0, 1.75]


def test_symmetric_loss_by_hand() -> None:
    """Users (0, 2), items (1, 0): 2 - 2 cos(q(f(u)), f_xi(i)) + 2 - 2 cos(q(f(i)), f_xi(u)), Â dense."""
    model = _model().eval()  # eval: no momentum update inside loss
    with torch.no_grad():
        model.target_emb.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1], [2, 0], [0, 3]]))
        model.predictor.weight.copy_(torch.tensor([[0.0, 1], [1, 0]]))  # q swaps the coordinates
        model.predictor.bias.zero_()
    adj = normalized_adjacency(TRAIN, 3, 3).to_dense()
    z = ((model.emb + adj @ model.emb) / 2).detach()
    t = (model.target_emb + adj @ model.target_emb) / 2
    users, items = torch.tensor([0, 2]), torch.tensor([1, 0])

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    ui = (2 - 2 * cos(z[users].flip(-1), t[3 + items])).mean()
    iu = (2 - 2 * cos(z[3 + items].flip(-1), t[users])).mean()
    terms = model.loss(users, items)
    torch.testing.assert_close(terms["ui"], ui)
    torch.testing.assert_close(terms["iu"], iu)
    torch.testing.assert_close(terms["loss"], ui + iu)


def test_each_step_moves_the_target_towards_the_previous_steps_weights() -> None:
    """xi_0 = theta_0; the loss of step 2 sets xi = tau xi_1 + (1 - tau) theta_1 with xi_1 = theta_0 (step 1's call
    finds xi = theta and leaves it). Eval or no_grad calls leave the target alone."""
    model = _model(momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    theta0 = model.emb.detach().clone()
    torch.testing.assert_close(model.target_emb, theta0)
    model.loss(users, items)["loss"].backward()
    opt.step()
    theta1 = model.emb.detach().clone()
    torch.testing.assert_close(model.target_emb, theta0)
    assert not torch.equal(theta1, theta0)
    with torch.no_grad():
        model.loss(users, items)
    model.eval().loss(users, items)
    torch.testing.assert_close(model.target_emb, theta0)
    model.train().loss(users, items)
    torch.testing.assert_close(model.target_emb, 0.9 * theta0 + 0.1 * theta1)


def test_score_is_both_directions_of_the_predictor() -> None:
    model = _model().eval()
    emb = model.embeddings()
    with torch.no_grad():
        z = model._online()
        q = model.predictor(z)
    want = q[:3] @ z[3:].T + z[:3] @ q[3:].T
    torch.testing.assert_close(emb["user"] @ emb["id"].T, want)
    torch.testing.assert_close(model.score(torch.arange(3)), want)


def test_gradients_reach_the_online_side_only() -> None:
    model = _model()
    model.loss(torch.tensor([0, 1]), torch.tensor([1, 2]))["loss"].backward()
    assert set(grad_norms(model)) == {"grad_embeddings", "grad_predictor"}
    assert "target_emb" in model.state_dict() and not model.target_emb.requires_grad


def test_builder_reads_its_keys(tiny) -> None:
    cfg = load_config(overrides=["model.name=buir", "model.embedding_dim=8", "model.n_layers=2",
                                 "model.momentum=0.9"])
    model = build_model(cfg, tiny)
    assert isinstance(model, BUIR) and model.emb.shape == (tiny.n_users + tiny.n_items, 8)
    assert (model.n_layers, model.momentum) == (2, 0.9)


# 3 epochs of run_epoch (batch 64) on the tiny set, seeds as in the test: the mean loss terms of each epoch
REFERENCE = [
    {"ui": 1.8123431205749512, "iu": 1.7903972864151, "loss": 3.6027402877807617},
    {"ui": 1.3229185342788696, "iu": 1.3735301494598389, "loss": 2.696448802947998},
    {"ui": 0.784037709236145, "iu": 0.8428490161895752, "loss": 1.6268867254257202},
]


def test_trajectory_is_pinned(tiny) -> None:
    torch.manual_seed(0)
    model = BUIR(tiny.n_users, tiny.n_items, normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items),
                 embedding_dim=16, n_layers=2, momentum=0.9)
    opt = make_optimizer(model, 1e-2)
    torch.manual_seed(2)
    rows = [run_epoch(model, opt, torch.from_numpy(tiny.train), 64, epoch) for epoch in range(3)]
    assert len(rows) == len(REFERENCE)
    for row, want in zip(rows, REFERENCE):
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-5)

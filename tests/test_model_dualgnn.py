"""DualGNN: the user co-occurrence graph and its aggregation by hand, the padding law against MMRec's urn, the
whole score and loss against a dense re-computation, gradients, determinism, the builder, a pinned trajectory."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch

from msi.config import load_config
from msi.data.graph import normalized_adjacency
from msi.models import build_model, grad_norms
from msi.models.dualgnn import DualGNN, cooccurrence_neighbours, padding_multiplicities
from msi.train import make_optimizer, run_epoch

# users 0..4 and items 0..3: u0 {0,1,2}, u1 {0,1}, u2 {2}, u3 {1,2}, u4 {3}; (0, 0) twice (counts once)
TRAIN = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 2], [3, 1], [3, 2], [4, 3], [0, 0]])
E = math.e
# k = 2: each row's two largest co-occurrence counts (ties: lower id), softmax of the counts
W_BY_HAND = torch.tensor([
    [0, 0.5, 0, 0.5, 0],                   # u0: u1 (2 items), u3 (2); u2 (1) is third
    [E / (E + 1), 0, 0, 1 / (E + 1), 0],   # u1: u0 (2), u3 (1)
    [0.5, 0, 0, 0.5, 0],                   # u2: u0 (1), u3 (1)
    [E / (E + 1), 1 / (E + 1), 0, 0, 0],   # u3: u0 (2), u1 (1); u2 (1) loses the tie
    [0, 0, 0, 0, 0],                       # u4: nobody shares item 3
])


def _hand_model(**kw) -> DualGNN:
    torch.manual_seed(0)
    feats = {"image": torch.randn(4, 3), "text": torch.randn(4, 2)}
    return DualGNN(5, 4, normalized_adjacency(TRAIN, 5, 4), feats, TRAIN, embedding_dim=2, n_neighbours=2, **kw)


def test_cooccurrence_neighbours_by_hand() -> None:
    indptr, cols, counts = cooccurrence_neighbours(TRAIN, 5, 4, k=2)
    assert indptr.tolist() == [0, 2, 4, 6, 8, 8]
    assert cols.tolist() == [1, 3, 0, 3, 0, 3, 0, 1]
    assert counts.tolist() == [2, 2, 2, 1, 1, 1, 2, 1]
    indptr, cols, counts = cooccurrence_neighbours(TRAIN, 5, 4, k=40)  # every neighbour
    assert indptr.tolist() == [0, 3, 5, 7, 10, 10] and cols[:3].tolist() == [1, 3, 2]


def test_user_graph_and_aggregation_against_a_dense_recomputation() -> None:
    """h_u = u_u + sum_j w_uj u_j with W by hand, and the rest of the score from the module docstring, dense."""
    model = _hand_model().eval()
    torch.testing.assert_close(model.user_graph_eval.to_dense(), W_BY_HAND)
    torch.testing.assert_close(model.user_graph_eval_t.to_dense(), W_BY_HAND.T)
    adj = normalized_adjacency(TRAIN, 5, 4).to_dense()
    users, items = torch.zeros(5, 2), torch.zeros(4, 2)
    for k, m in enumerate(("image", "text")):
        x = torch.cat([model.preference[m], model.mlp[m](getattr(model, f"feat_{k}"))]).detach()
        x = x / x.norm(dim=1, keepdim=True)
        r = x + adj @ x + adj @ adj @ x
        users += model.modality_weight.detach()[:, k : k + 1] * r[:5]
        items += r[5:]
    emb = model.embeddings()
    torch.testing.assert_close(emb["user"], users + W_BY_HAND @ users)
    torch.testing.assert_close(emb["id"], items)
    torch.testing.assert_close(emb["user"][4], users[4])  # no neighbour: no aggregation


def test_training_graph_weights_follow_the_multiplicities() -> None:
    """Row u1 padded to (1, 1) stays softmax(2, 1); row u2 with multiplicities (3, 1): w = (3e, e) / (4e)."""
    model = _hand_model()
    model._set_user_graph("train", torch.tensor([1.0, 1, 1, 1, 3, 1, 1, 1]))
    want = W_BY_HAND.clone()
    want[2, 0], want[2, 3] = 0.75, 0.25
    torch.testing.assert_close(model.user_graph_train.to_dense(), want)
    torch.testing.assert_close(model.user_graph_eval.to_dense(), W_BY_HAND)


@lru_cache(maxsize=None)
def _urn_law(counts: tuple[int, ...], left: int) -> dict[tuple[int, ...], float]:
    """MMRec's padding, exactly: ``left`` more draws, each copying a uniformly chosen slot of the growing list."""
    if left == 0:
        return {counts: 1.0}
    law: dict[tuple[int, ...], float] = {}
    for j, c in enumerate(counts):
        nxt = counts[:j] + (c + 1,) + counts[j + 1 :]
        for comp, p in _urn_law(nxt, left - 1).items():
            law[comp] = law.get(comp, 0.0) + p * c / sum(counts)
    return law


def test_padding_follows_mmrecs_urn() -> None:
    torch.manual_seed(0)
    degrees = torch.tensor([3] * 30000 + [0, 6, 7])  # k = 6: the three last users are not padded
    mult = padding_multiplicities(degrees, 6)
    assert mult[-13:].tolist() == [1.0] * 13
    draws = mult[:-13].view(-1, 3)
    assert bool((draws >= 1).all()) and draws.sum(1).tolist() == [6.0] * 30000
    law = _urn_law((1, 1, 1), 3)
    assert len(law) == 10 and all(p == pytest.approx(0.1) for p in law.values())  # uniform compositions
    seen = {comp: 0 for comp in law}
    for row in draws.long().tolist():
        seen[tuple(row)] += 1
    assert {c: n / 30000 for c, n in seen.items()} == pytest.approx(law, abs=0.01)


def test_start_epoch_repads_only_short_rows_and_only_when_asked() -> None:
    model = _hand_model()
    model.n_neighbours = 3  # every row of the hand graph (2 neighbours) is now short
    torch.manual_seed(1)
    model.start_epoch(0)
    train = model.user_graph_train.to_dense()
    assert not torch.equal(train, W_BY_HAND) and torch.equal(train != 0, W_BY_HAND != 0)
    torch.testing.assert_close(model.user_graph_eval.to_dense(), W_BY_HAND)
    fixed = _hand_model(neighbour_resampling=False)
    fixed.start_epoch(0)
    torch.testing.assert_close(fixed.user_graph_train.to_dense(), W_BY_HAND)


def test_loss_terms_against_a_dense_recomputation(monkeypatch) -> None:
    model = _hand_model(gamma=0.5)
    users, items, neg = torch.tensor([0, 3, 0]), torch.tensor([1, 2, 0]), torch.tensor([3, 0, 3])
    monkeypatch.setattr(model, "sample_negatives", lambda u: neg)
    terms = model.loss(users, items)
    user, item = model._representations("train")
    diff = (user[users] * item[items]).sum(1) - (user[users] * item[neg]).sum(1)
    want_bpr = -torch.log(torch.sigmoid(diff)).mean()
    want_reg = sum((model.preference[m][users] ** 2).mean() for m in ("image", "text"))
    want_reg = want_reg + (model.modality_weight**2).mean()
    torch.testing.assert_close(terms["bpr"], want_bpr)
    torch.testing.assert_close(terms["reg"], want_reg)
    torch.testing.assert_close(terms["loss"], want_bpr + 0.5 * want_reg)


def test_gradients_groups_and_eval_determinism() -> None:
    model = _hand_model()
    model.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))["loss"].backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert set(grad_norms(model)) == {"grad_preferences", "grad_projections", "grad_fusion"}
    model.eval()
    first, second = model.embeddings(), model.embeddings()
    assert set(first) == {"user", "id"} and all(torch.equal(first[k], second[k]) for k in first)


def test_builder_reads_its_keys(tiny) -> None:
    cfg = load_config(overrides=["model.name=dualgnn", "model.embedding_dim=8", "model.n_layers=1",
                                 "model.n_neighbours=5", "model.neighbour_resampling=false", "loss.gamma=0.25"])
    model = build_model(cfg, tiny)
    assert isinstance(model, DualGNN) and model.preference["image"].shape == (tiny.n_users, 8)
    assert (model.n_layers, model.n_neighbours, model.neighbour_resampling, model.gamma) == (1, 5, False, 0.25)
    assert model.modalities == ("image", "text") and int(model.nb_degrees.max()) == 5


# 3 epochs of run_epoch (batch 64, start_epoch before each; k = 30: 13 of the 60 users are padded) on the tiny set,
# seeds as in the test: the mean loss terms of each epoch
REFERENCE = [
    {"bpr": 0.4509828984737396, "reg": 0.31076160073280334, "loss": 0.4725187122821808},
    {"bpr": 0.30738580226898193, "reg": 0.3122282922267914, "loss": 0.32902324199676514},
    {"bpr": 0.24014639854431152, "reg": 0.3144051432609558, "loss": 0.26193463802337646},
]


def test_trajectory_is_pinned(tiny) -> None:
    torch.manual_seed(0)
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    model = DualGNN(tiny.n_users, tiny.n_items, adj, feats, tiny.train, embedding_dim=16, n_neighbours=30)
    opt = make_optimizer(model, 1e-3)
    torch.manual_seed(2)
    rows = []
    for epoch in range(3):
        model.start_epoch(epoch)
        rows.append(run_epoch(model, opt, torch.from_numpy(tiny.train), 64, epoch))
    assert len(rows) == len(REFERENCE)
    for row, want in zip(rows, REFERENCE):
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-5)

"""msi.models.lattice: the learned kNN item graph by hand and against a dense re-computation (gradients included),
the D^-1 (R + I) propagation, the per-epoch rebuild, eval-mode determinism, and a pinned 3-epoch trajectory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msi.config import load_config
from msi.data.graph import normalized_adjacency
from msi.models import build_model
from msi.models.knn import to_csr
from msi.models.lattice import LATTICE
from tests.conftest import assert_trajectory, pinned_rows

TRAIN = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [3, 0], [3, 2], [1, 3]])  # 4 users, 4 items
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [3.0, -1.0]])  # tests/test_knn.py's four items


def make(features: dict[str, torch.Tensor], dim: int = 2, **kw) -> LATTICE:
    torch.manual_seed(0)
    return LATTICE(4, 4, TRAIN, features, embedding_dim=3, feature_dim=dim, knn_k=2, **kw)


def dense_graph(model: LATTICE) -> torch.Tensor:
    """A from the module docstring with dense I x I matrices."""
    a = torch.softmax(model.modal_weight, 0)

    def knn(x):
        xn = x / x.norm(dim=1, keepdim=True)
        sim = xn @ xn.T
        top = torch.topk(sim, 2, dim=1)
        return torch.zeros_like(sim).scatter(1, top.indices, top.values)

    def norm(s):
        d = s.sum(1).pow(-0.5)
        return d[:, None] * s * d[None, :]

    learned = sum(w * knn(model.proj[m](model.raw[m])) for w, m in zip(a, model.modalities))
    init = sum(w * norm(knn(model.raw[m].detach())) for w, m in zip(a, model.modalities))  # fixed, but weighted
    return (1 - model.lam) * norm(learned) + model.lam * init


def test_learned_graph_by_hand() -> None:
    """One modality, W = diag(1, 3), b = 0: the learned 2-NN are {0, 3}, {1, 2}, {2, 1}, {3, 0} with cosines 1/√2,
    3/√13, 3/√13, 1/√2; the raw features' 2-NN those of tests/test_knn.py. A = 0.5 learned + 0.5 initial."""
    model = make({"image": X}, init_graph_weight=0.5)
    with torch.no_grad():
        model.proj["image"].weight.copy_(torch.diag(torch.tensor([1.0, 3.0])))
        model.proj["image"].bias.zero_()
    r2, r13 = 1 / math.sqrt(2), 3 / math.sqrt(13)
    learned = torch.zeros(4, 4)
    for i, j, s in [(0, 3, r2), (1, 2, r13), (2, 1, r13), (3, 0, r2)]:
        learned[i, i], learned[i, j] = 1 / (1 + s), s / (1 + s)  # rows i and j have the same sum 1 + s
    d = [1 + 3 / math.sqrt(10), 1 + 1 / math.sqrt(5), 1 + 2 / math.sqrt(5), 1 + 3 / math.sqrt(10)]
    init = torch.zeros(4, 4)
    for i, j, s in [(0, 3, 3 / math.sqrt(10)), (1, 2, 1 / math.sqrt(5)), (2, 0, 2 / math.sqrt(5)),
                    (3, 0, 3 / math.sqrt(10))]:
        init[i, i], init[i, j] = 1 / d[i], s / math.sqrt(d[i] * d[j])
    got = to_csr(*model.learned_graph(), 4).to_dense()
    torch.testing.assert_close(got, 0.5 * learned + 0.5 * init)
    assert got[1, 2] == pytest.approx(0.5 * 0.4541634 + 0.5 * 0.2700908, rel=1e-6)


def test_learned_graph_equals_dense_computation_with_gradients() -> None:
    torch.manual_seed(5)
    feats = {"image": torch.randn(4, 3), "audio": torch.randn(4, 5)}  # not in sorted order
    model = make(feats, dim=3, init_graph_weight=0.9)
    assert model.modalities == ["image", "audio"]
    with torch.no_grad():
        model.modal_weight.copy_(torch.tensor([0.3, -0.2]))
    w = torch.randn(4, 4)
    rows, cols, vals = model.learned_graph()
    ours = torch.zeros(4, 4).index_put((rows, cols), vals, accumulate=True)
    (ours * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = dense_graph(model)
    torch.testing.assert_close(ours.detach(), want.detach())
    (want * w).sum().backward()
    assert set(got) == {"raw.image", "raw.audio", "proj.image.weight", "proj.image.bias", "proj.audio.weight",
                        "proj.audio.bias", "modal_weight"}
    for n, g in got.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, msg=n)


def test_propagation_is_the_random_walk_mean_and_items_add_the_normalized_graph_part() -> None:
    model = make({"image": X}).eval()
    a = torch.zeros(8, 8)
    for u, i in TRAIN:
        a[u, 4 + i] = a[4 + i, u] = 1.0
    p = (a + torch.eye(8)) / (a + torch.eye(8)).sum(1, keepdim=True)  # D^-1 (R + I)
    x = torch.cat([model.user, model.item]).detach()
    z = (x + p @ x + p @ p @ x) / 3
    h = F.normalize(dense_graph(model).detach() @ model.item.detach(), dim=1)
    emb = model.embeddings()
    torch.testing.assert_close(emb["user"], z[:4])
    torch.testing.assert_close(emb["id"], z[4:] + h)
    assert torch.equal(emb["id"], model.embeddings()["id"])  # eval mode is deterministic


def test_the_graph_learns_at_an_epochs_first_batch_only() -> None:
    model = make({"image": X, "audio": torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 1.0], [-1.0, 0.3]])}, gamma=0.1)
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])
    graph_params = [*model.raw.values(), *model.proj.parameters(), model.modal_weight]
    for batch, learns in [(0, True), (1, False)]:
        model.zero_grad()
        model.loss(users, items)["loss"].backward()
        assert model.user.grad.abs().sum() > 0 and model.item.grad.abs().sum() > 0
        assert all((p.grad is not None and bool(p.grad.abs().sum() > 0)) == learns for p in graph_params), batch
    held = model.epoch_graph
    model.embeddings()
    assert model.epoch_graph is held  # scoring does not replace the epoch's graph
    model.start_epoch(1)
    assert model.epoch_graph is None
    assert {n.split(".")[0] for n, _ in model.named_parameters()} <= set(model.param_groups)


def test_loss_is_bpr_plus_l2_of_the_batch_representations(monkeypatch) -> None:
    model = make({"image": X}, gamma=0.5)
    users, items, neg = torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1])
    monkeypatch.setattr(model, "sample_negatives", lambda u: neg)
    emb = model.eval().embeddings()
    u, i, j = emb["user"][users], emb["id"][items], emb["id"][neg]
    bpr = -F.logsigmoid((u * i).sum(1) - (u * j).sum(1)).mean()
    reg = (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / 6
    terms = model.train().loss(users, items)
    torch.testing.assert_close(terms["bpr"], bpr)
    torch.testing.assert_close(terms["loss"], bpr + 0.5 * reg)


def test_self_loop_adjacency_is_symmetric_normalized_r_plus_i() -> None:
    a = normalized_adjacency(TRAIN, 4, 4, self_loops=True).to_dense()
    deg = torch.tensor([3.0, 3, 2, 3, 3, 3, 3, 2])  # degree + 1
    assert a[0, 0] == pytest.approx(1 / 3) and a[2, 6] == pytest.approx(1 / math.sqrt(2 * 3))
    assert a[7, 7] == pytest.approx(1 / 2) and torch.equal(a, a.T)
    torch.testing.assert_close(a.sum(1), ((a > 0).float() @ deg.rsqrt()) * deg.rsqrt())


# 3 epochs of LATTICE on the tiny set (d 8, feature_dim 8, k 3, lambda 0.9, gamma 0.1, batch 64, Adam lr 1e-3,
# seeds as below): the mean loss terms of each epoch, recorded from this implementation
REFERENCE_LOSSES = [
    {"bpr": 0.6766435503959656, "reg": 1.4603267908096313, "loss": 0.8226763606071472},
    {"bpr": 0.6631381511688232, "reg": 1.4775422811508179, "loss": 0.8108924627304077},
    {"bpr": 0.6634522676467896, "reg": 1.4775310754776, "loss": 0.8112053871154785},
]


def test_pinned_trajectory(tiny) -> None:
    torch.manual_seed(0)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    model = LATTICE(tiny.n_users, tiny.n_items, tiny.train, feats, embedding_dim=8, feature_dim=8, knn_k=3,
                    gamma=0.1)
    assert_trajectory(pinned_rows(model, tiny, 1e-3), REFERENCE_LOSSES)


def test_builder_reads_its_keys(tiny) -> None:
    cfg = load_config(overrides=["model.name=lattice", "model.embedding_dim=6", "model.feature_dim=5",
                                 "model.n_layers=3", "model.n_item_layers=2", "model.knn_k=4",
                                 "model.init_graph_weight=0.3", "loss.gamma=0.01"])
    model = build_model(cfg, tiny)
    assert isinstance(model, LATTICE) and model.user.shape == (tiny.n_users, 6)
    assert model.proj["image"].weight.shape == (5, tiny.features["image"].shape[1])
    assert (model.n_layers, model.n_item_layers, model.k, model.lam, model.gamma) == (3, 2, 4, 0.3, 0.01)
    assert model.modalities == list(tiny.features)

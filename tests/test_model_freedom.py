"""msi.models.freedom: the frozen item graph and the degree-sensitive edge pruning by hand, the loss against a dense
re-computation, which parameters learn, eval-mode determinism, and a pinned 3-epoch trajectory on the tiny set."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from msi.config import load_config
from msi.data.graph import normalized_adjacency
from msi.models import build_model
from msi.models.freedom import FREEDOM, frozen_item_graph, pruning_weights
from msi.models.knn import to_csr
from tests.conftest import assert_trajectory, pinned_rows

# 4 users, 3 items: degrees users (2, 1, 1, 2), items (2, 2, 2)
TRAIN = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [3, 0], [3, 2]])
# 3 items; image: 2-nearest {0, 2}, {1, 2}, {2, 0} (cosines 0.74 of 0 and 2, 0.67 of 1 and 2, 0 of 0 and 1);
# audio: {0, 1}, {1, 0}, {2, 1} (cosines 0.995 of 0 and 1, 0.10 of 0 and 2, 0.20 of 1 and 2)
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.9]])
AUDIO = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.0, 1.0]])


def make(dim: int = 4, **kw) -> FREEDOM:
    torch.manual_seed(0)
    return FREEDOM(4, 3, TRAIN, {"image": IMAGE, "audio": AUDIO}, embedding_dim=dim, knn_k=2, **kw)


def test_frozen_item_graph_by_hand() -> None:
    """S = 0.1 S_image + 0.9 S_audio, each entry of a modality's binary 2-NN graph 1/2 after D^-1/2 S D^-1/2."""
    rows, cols, vals = frozen_item_graph({"image": IMAGE, "audio": AUDIO}, 2, 0.1)
    image = [[0.5, 0, 0.5], [0, 0.5, 0.5], [0.5, 0, 0.5]]
    audio = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]]
    want = 0.1 * torch.tensor(image) + 0.9 * torch.tensor(audio)
    torch.testing.assert_close(to_csr(rows, cols, vals, 3).to_dense(), want)
    model = make()
    torch.testing.assert_close(model.item_graph.to_dense(), want)
    torch.testing.assert_close(model.item_graph_t.to_dense(), want.T)
    rows, cols, vals = frozen_item_graph({"audio": AUDIO}, 2, 0.1)  # one modality weighs 1
    torch.testing.assert_close(to_csr(rows, cols, vals, 3).to_dense(), torch.tensor(audio))
    three = frozen_item_graph({"a": IMAGE, "b": AUDIO, "c": AUDIO}, 2, 0.4)  # the rest share 0.6
    torch.testing.assert_close(to_csr(*three, 3).to_dense(), 0.4 * torch.tensor(image) + 0.6 * torch.tensor(audio))


def test_pruning_weights_are_one_over_root_degrees() -> None:
    w = pruning_weights(torch.from_numpy(TRAIN), 4, 3)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, r, r, 0.5, 0.5]))


def test_pruning_draws_by_degree_and_renormalizes(monkeypatch) -> None:
    """rho = 0.5 keeps int(6 * 0.5) = 3 edges drawn without replacement with weights 1/sqrt(d_u d_i); the kept
    edges (0,1), (1,1), (3,2) are normalized by their own degrees (item 1 has two)."""
    model = make(dropout=0.5)
    calls = []

    def draw(weights, n, replacement):
        calls.append((weights.clone(), n, replacement))
        return torch.tensor([1, 2, 5])

    monkeypatch.setattr(torch, "multinomial", draw)
    adj = model.prune().to_dense()
    torch.testing.assert_close(calls[0][0], pruning_weights(torch.from_numpy(TRAIN), 4, 3))
    assert calls[0][1:] == (3, False)
    want = torch.zeros(7, 7)
    r = 1 / math.sqrt(2)
    for u, i, v in [(0, 1, r), (1, 1, r), (3, 2, 1.0)]:
        want[u, 4 + i] = want[4 + i, u] = v
    torch.testing.assert_close(adj, want)


def test_pruning_is_redrawn_each_epoch_and_rho_zero_keeps_the_full_graph() -> None:
    model = make(dropout=0.5)
    users, items = torch.tensor([0, 1]), torch.tensor([0, 1])
    torch.manual_seed(3)
    model.start_epoch(0)
    model.loss(users, items)
    first = model.pruned_adj
    model.loss(users, items)
    assert model.pruned_adj is first  # one draw per epoch
    model.start_epoch(1)
    model.loss(users, items)
    assert model.pruned_adj is not first and model.pruned_adj._nnz() == 6  # 3 edges, both directions
    assert torch.equal(make(dropout=0.0).prune().to_dense(), normalized_adjacency(TRAIN, 4, 3).to_dense())


def test_loss_equals_dense_computation(monkeypatch) -> None:
    model = make(dropout=0.0, modality_weight=0.3)
    users, items, neg = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]), torch.tensor([2, 0, 1, 1])
    monkeypatch.setattr(model, "sample_negatives", lambda u: neg)
    with torch.no_grad():
        model.item.add_(torch.randn(3, 4))  # make the item graph's part matter
    adj = normalized_adjacency(TRAIN, 4, 3).to_dense()
    x = torch.cat([model.user, model.item]).detach()
    z = (x + adj @ x + adj @ adj @ x) / 3
    user, item = z[:4], z[4:] + model.item_graph.to_dense() @ model.item.detach()
    u = user[users]
    bpr = -F.logsigmoid((u * item[items]).sum(1) - (u * item[neg]).sum(1)).mean()
    feat = 0.0
    for m in ("image", "audio"):
        p = model.proj[m](model.raw[m]).detach()
        feat = feat - F.logsigmoid((u * p[items]).sum(1) - (u * p[neg]).sum(1)).mean()
    terms = model.loss(users, items)
    torch.testing.assert_close(terms["bpr"], bpr)
    torch.testing.assert_close(terms["feature_bpr"], feat)
    torch.testing.assert_close(terms["loss"], bpr + 0.3 * feat)
    torch.testing.assert_close(model.embeddings()["id"], item)


def test_the_features_learn_only_through_the_modality_term() -> None:
    """At lambda = 0 (MMRec's default) the term is not computed: no gradient reaches the features."""
    for weight, learns in [(0.0, False), (0.1, True)]:
        model = make(modality_weight=weight)
        model.loss(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2]))["loss"].backward()
        assert model.user.grad.abs().sum() > 0 and model.item.grad.abs().sum() > 0
        for p in [*model.raw.values(), *model.proj.parameters()]:
            assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == learns
        assert {n.split(".")[0] for n, _ in model.named_parameters()} <= set(model.param_groups)


def test_eval_mode_is_deterministic() -> None:
    model = make().eval()
    a, b = model.embeddings(), model.embeddings()
    assert set(a) == {"user", "id"} and a["user"].shape == (4, 4) and a["id"].shape == (3, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


# 3 epochs of FREEDOM on the tiny set (d 8, k 3, rho 0.8, lambda 0.1, batch 64, Adam lr 1e-3, seeds as below):
# the mean loss terms of each epoch, recorded from this implementation
REFERENCE_LOSSES = [
    {"bpr": 0.6858824491500854, "feature_bpr": 1.3698021173477173, "loss": 0.8228627443313599},
    {"bpr": 0.680894672870636, "feature_bpr": 1.3742623329162598, "loss": 0.8183208703994751},
    {"bpr": 0.6810863018035889, "feature_bpr": 1.3370983600616455, "loss": 0.8147960901260376},
]


def test_pinned_trajectory(tiny) -> None:
    torch.manual_seed(0)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    model = FREEDOM(tiny.n_users, tiny.n_items, tiny.train, feats, embedding_dim=8, knn_k=3, modality_weight=0.1)
    assert_trajectory(pinned_rows(model, tiny, 1e-3), REFERENCE_LOSSES)


def test_builder_reads_its_keys(tiny) -> None:
    cfg = load_config(overrides=["model.name=freedom", "model.embedding_dim=6", "model.n_layers=3",
                                 "model.n_item_layers=2", "model.knn_k=4", "model.first_graph_weight=0.25",
                                 "model.dropout=0.5", "loss.modality_weight=0.01"])
    model = build_model(cfg, tiny)
    assert isinstance(model, FREEDOM) and model.user.shape == (tiny.n_users, 6)
    assert (model.n_layers, model.n_item_layers, model.dropout, model.modality_weight) == (3, 2, 0.5, 0.01)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    rows, cols, vals = frozen_item_graph(feats, 4, 0.25)
    torch.testing.assert_close(model.item_graph.to_dense(), to_csr(rows, cols, vals, tiny.n_items).to_dense())

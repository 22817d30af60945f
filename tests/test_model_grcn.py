"""msi.models.grcn: the refined edge weights and their pruning by hand, routing and the ID propagation against
dense re-computations, the loss terms, gradients, eval-mode determinism, and a pinned 3-epoch trajectory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msi.models import grad_norms
from msi.models.grcn import GRCN
from tests.conftest import pinned_rows

# 2 users, 2 items: u0 - i0, i1; u1 - i1. Edges in this order (sorted by user, then item).
TRAIN = torch.tensor([[0, 0], [0, 1], [1, 1]])


def _hand_model(n_routing: int = 0) -> GRCN:
    """Modalities a and b, identity projections: f_i0 = (1, 0), f_i1 = (0, 1) in both; a's prototypes
    u0 = (1, 1) / sqrt 2, u1 = (0, 1); b's u0 = u1 = (1, 0). Confidence columns (a, b) per node."""
    feats = {"a": torch.tensor([[3.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[3.0, 0.0], [0.0, 2.0]])}
    model = GRCN(2, 2, TRAIN, feats, embedding_dim=2, content_dim=2, n_layers=2, n_routing=n_routing, gamma=0.0)
    with torch.no_grad():
        for r in model.refiners.values():
            r.project.weight.copy_(torch.eye(2)), r.project.bias.zero_()
        model.refiners["a"].preference.copy_(torch.tensor([[1.0, 1.0], [0.0, 5.0]]))
        model.refiners["b"].preference.copy_(torch.tensor([[1.0, 0.0], [4.0, 0.0]]))
        #                                          u0           u1            i0          i1
        model.confidence.copy_(torch.tensor([[2.0, 1.0], [-1.0, -0.5], [0.5, 1.0], [3.0, -2.0]]))
    return model


def test_refined_edge_weights_and_pruning_by_hand():
    """Affinities s_ui = p_u.f_i: a: (u0,i0) = (u0,i1) = 1/sqrt 2, (u1,i1) = 1; b: 1, 0, 0.
    u->i softmax over an item's users, i->u over a user's items; weight = relu(max_m affinity * K[source, m])."""
    q = 1 / (1 + math.exp(1 - 1 / math.sqrt(2)))  # a: u0's share of i1 (u1 has 1 - q)
    e = math.e / (math.e + 1)  # b: i0's share of u0 (i1 has 1 - e)
    to_item = [max(1 * 2.0, 1 * 1.0), max(q * 2.0, 0.5 * 1.0), max((1 - q) * -1.0, 0.5 * -0.5, 0.0)]  # pruned
    to_user = [max(0.5 * 0.5, e * 1.0), max(0.5 * 3.0, (1 - e) * -2.0), max(1 * 3.0, 1 * -2.0)]
    (w_ui, w_iu), _ = _hand_model().edge_weights()
    torch.testing.assert_close(w_ui, torch.tensor(to_item), rtol=0, atol=1e-6)
    torch.testing.assert_close(w_iu, torch.tensor(to_user), rtol=0, atol=1e-6)
    assert w_ui[2] == 0  # the edge u1 -> i1: negative in every modality, pruned


def test_representation_against_a_dense_recomputation():
    """Routing (one pass) and the content c_m with dense per-user softmaxes; z = x + A_w x + A_w^2 x."""
    model = _hand_model(n_routing=1)
    (w_ui, w_iu), content = model.edge_weights()
    with torch.no_grad():
        f = F.normalize(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
        for m, c in zip(("a", "b"), content):
            p = F.normalize(model.refiners[m].preference)
            items_of = [[0, 1], [1]]
            p = F.normalize(torch.stack([p[u] + torch.softmax(f[its] @ p[u], 0) @ f[its] for u, its in
                                         enumerate(items_of)]))
            s = p @ f.T  # (U, I); edges (0,0), (0,1), (1,1)
            user_rows = torch.stack([p[0] + torch.softmax(s[0], 0) @ f, p[1] + f[1]])
            item_rows = torch.stack([f[0] + p[0], f[1] + torch.softmax(s[:, 1], 0) @ p])
            torch.testing.assert_close(c, torch.cat([user_rows, item_rows]))
        a = torch.zeros(4, 4)
        for e, (u, i) in enumerate(TRAIN.tolist()):
            a[2 + i, u], a[u, 2 + i] = w_ui[e], w_iu[e]
        x = F.normalize(model.id_emb)
        want = torch.cat([x + a @ x + a @ a @ x, *content], 1)
        emb = model.eval().embeddings()
    torch.testing.assert_close(torch.cat([emb["user"], emb["id"]]), want)


def _small(**kw) -> GRCN:
    torch.manual_seed(0)
    feats = {"image": torch.randn(3, 4), "text": torch.randn(3, 2)}
    return GRCN(2, 3, torch.tensor([[0, 0], [0, 1], [1, 1], [1, 2]]), feats, embedding_dim=3, content_dim=2, **kw)


def test_loss_terms(monkeypatch):
    model = _small(gamma=0.5)
    users, items, neg = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 1]), torch.tensor([2, 0, 0])
    monkeypatch.setattr(model, "sample_negatives", lambda u: neg)
    terms = model.loss(users, items)
    with torch.no_grad():
        r = model._represent()
        u, p, n = r[users], r[2 + items], r[2 + neg]
        bpr = -F.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        e = model.id_emb
        ids = ((e[users] ** 2 + e[2 + items] ** 2).mean() + (e[users] ** 2 + e[2 + neg] ** 2).mean()) / 2
        prefs = sum((m.preference ** 2).mean() + (m.preference[users] ** 2).mean() for m in model.refiners.values())
    assert r.shape == (5, 3 + 2 * 2)
    torch.testing.assert_close(terms["bpr"], bpr)
    torch.testing.assert_close(terms["reg"], ids + prefs)
    torch.testing.assert_close(terms["loss"], bpr + 0.5 * (ids + prefs))


def test_gradients_reach_every_parameter():
    model = _small()
    assert {n.split(".")[0] for n, _ in model.named_parameters()} <= set(model.param_groups)
    model.loss(torch.tensor([0, 1]), torch.tensor([0, 2]))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(grad_norms(model)) == {"grad_refiners", "grad_embeddings"}


def test_eval_mode_is_deterministic():
    model = _small().eval()
    first, second = model.embeddings(), model.embeddings()
    assert first["user"].shape == (2, 7) and first["id"].shape == (3, 7)
    assert all(torch.equal(first[k], second[k]) for k in ("user", "id"))


# 3 epochs on the tiny set (batch 64, lr 1e-3, seeds 0 and 2), without and with routing: the mean loss of each
# epoch, recorded from this implementation
PINNED = {
    0: [0.5852830410003662, 0.5196961164474487, 0.47822993993759155],
    3: [0.4451310634613037, 0.38943183422088623, 0.36357471346855164],
}


def _pinned_losses(tiny, n_routing: int) -> list[float]:
    torch.manual_seed(0)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    model = GRCN(tiny.n_users, tiny.n_items, tiny.train, feats, embedding_dim=16, content_dim=8, n_routing=n_routing,
                 gamma=0.1)
    return [row["loss"] for row in pinned_rows(model, tiny, 1e-3)]


@pytest.mark.parametrize("n_routing", [0, 3])
def test_pinned_trajectory(tiny, n_routing):
    assert _pinned_losses(tiny, n_routing) == pytest.approx(PINNED[n_routing], rel=1e-5)

"""msi.models.mmgcn: one modality layer by hand, the towers against a dense re-computation, the loss terms, which
parameters learn (frozen or not), eval-mode determinism, and a pinned 3-epoch trajectory on the tiny set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msi.data.graph import mean_adjacency
from msi.models import grad_norms
from msi.models.mmgcn import MMGCN
from tests.conftest import pinned_rows

# 2 users, 3 items: u0 - i0, i1; u1 - i1, i2. Nodes u0, u1, i0 = 2, i1 = 3, i2 = 4.
TRAIN = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 2]])


def _small(frozen: bool = False, **kw) -> MMGCN:
    torch.manual_seed(0)
    feats = {"image": torch.randn(3, 4), "text": torch.randn(3, 2)}
    return MMGCN(2, 3, mean_adjacency(TRAIN.numpy(), 2, 3), feats, TRAIN, embedding_dim=3, latent_dim=5,
                 n_layers=2, frozen_embeddings=frozen, **kw)


def test_one_layer_by_hand():
    """One layer with identity-like weights on a 1-d tower: every number follows from the equations."""
    feats = {"a": torch.tensor([[3.0], [-4.0], [2.0]])}
    model = MMGCN(2, 3, mean_adjacency(TRAIN.numpy(), 2, 3), feats, TRAIN, embedding_dim=1, latent_dim=1,
                  n_layers=1)
    tower = model.towers["a"]
    with torch.no_grad():
        tower.project.weight.fill_(1.0), tower.project.bias.fill_(0.0)
        tower.preference.copy_(torch.tensor([[-2.0], [5.0]]))
        tower.conv[0].fill_(2.0)
        tower.linear[0].weight.fill_(1.0), tower.linear[0].bias.fill_(0.0)
        tower.combine[0].weight.copy_(torch.tensor([[1.0, 1.0]])), tower.combine[0].bias.fill_(0.0)
        model.id_emb.copy_(torch.tensor([[0.5], [0.0], [0.0], [1.0], [0.0]]))
    # x = normalize([-2, 5, 3, -4, 2]) = [-1, 1, 1, -1, 1]; x C = 2x; mean over neighbours:
    # u0: (2 - 2) / 2 = 0, u1: (-2 + 2) / 2 = 0, i0: -2, i1: (-2 + 2) / 2 = 0, i2: 2
    # h = lr([0, 0, -2, 0, 2]) = [0, 0, -0.02, 0, 2]; x_hat = lr(x) + e = [0.49, 1, 1, 0.99, 1]
    want = F.leaky_relu(torch.tensor([0.49, 1.0, 0.98, 0.99, 3.0]))
    emb = model.eval().embeddings()
    torch.testing.assert_close(torch.cat([emb["user"], emb["id"]]).squeeze(1), want, rtol=0, atol=1e-6)


def _dense_tower(tower, id_emb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    items = tower.features if tower.project is None else tower.features @ tower.project.weight.T + tower.project.bias
    x = torch.cat([tower.preference, items])
    x = x / x.norm(dim=1, keepdim=True)
    for conv, lin, comb in zip(tower.conv, tower.linear, tower.combine):
        h = F.leaky_relu(a @ x @ conv)
        x_hat = F.leaky_relu(x @ lin.weight.T + lin.bias) + id_emb
        x = F.leaky_relu(torch.cat([h, x_hat], 1) @ comb.weight.T + comb.bias)
    return x


def test_representation_against_a_dense_recomputation():
    """R = the mean of the towers, each with Â = D^-1 A written densely (degrees 2 everywhere but i0, i2: 1)."""
    model = _small()
    a = torch.zeros(5, 5)
    for u, i in TRAIN.tolist():
        a[u, 2 + i] = a[2 + i, u] = 1.0
    a = a / a.sum(1, keepdim=True)
    with torch.no_grad():
        want = torch.stack([_dense_tower(t, model.id_emb, a) for t in model.towers.values()]).mean(0)
        emb = model.eval().embeddings()
    torch.testing.assert_close(emb["user"], want[:2])
    torch.testing.assert_close(emb["id"], want[2:])


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
        ids = torch.cat([e[users].repeat_interleave(2, 0), torch.stack([e[2 + items], e[2 + neg]], 1).view(-1, 3)])
        reg = (ids[:6] ** 2 + ids[6:] ** 2).mean() + sum(t.preference.pow(2).mean() for t in model.towers.values())
    torch.testing.assert_close(terms["bpr"], bpr)
    torch.testing.assert_close(terms["reg"], reg)
    torch.testing.assert_close(terms["loss"], bpr + 0.5 * reg)


@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_the_right_parameters(frozen):
    """Learned: every parameter, ID embeddings and preferences included. Frozen (MMRec's arithmetic): the ID
    embeddings and preferences are buffers, saved in the state dict and never changed by a step."""
    model = _small(frozen)
    names = {n for n, _ in model.named_parameters()}
    assert ("id_emb" in names) != frozen and ("towers.image.preference" in names) != frozen
    assert {"towers.image.conv.0", "towers.text.combine.1.weight", "towers.image.project.bias"} <= names
    assert "towers.text.project.weight" not in names  # only the first modality is projected
    assert model.towers["text"].conv[0].shape == (2, 2) and model.towers["image"].conv[0].shape == (5, 5)
    assert "id_emb" in model.state_dict() and "towers.text.preference" in model.state_dict()
    model.loss(TRAIN[:, 0], TRAIN[:, 1])["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert set(grad_norms(model)) == ({"grad_towers"} if frozen else {"grad_towers", "grad_embeddings"})


def test_eval_mode_is_deterministic():
    model = _small().eval()
    first, second = model.embeddings(), model.embeddings()
    assert first["user"].shape == (2, 3) and first["id"].shape == (3, 3)
    assert all(torch.equal(first[k], second[k]) for k in ("user", "id"))


# 3 epochs on the tiny set (batch 64, lr 1e-3, seeds 0 and 2): the mean loss of each epoch, recorded from this
# implementation
PINNED = {
    False: [0.6925401091575623, 0.6917004585266113, 0.6896296739578247],
    True: [0.6926264762878418, 0.6921512484550476, 0.6910430788993835],
}


def _pinned_losses(tiny, frozen: bool) -> list[float]:
    torch.manual_seed(0)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    model = MMGCN(tiny.n_users, tiny.n_items, mean_adjacency(tiny.train, tiny.n_users, tiny.n_items), feats,
                  tiny.train, embedding_dim=16, latent_dim=32, frozen_embeddings=frozen, gamma=1e-3)
    return [row["loss"] for row in pinned_rows(model, tiny, 1e-3)]


@pytest.mark.parametrize("frozen", [False, True])
def test_pinned_trajectory(tiny, frozen):
    assert _pinned_losses(tiny, frozen) == pytest.approx(PINNED[frozen], rel=1e-5)

"""msi.models: propagation, the fused sparse product, stop-gradient, BM3 and MSI against dense re-computations,
training of every variant, determinism in eval mode, scoring, recommending (train items left out by default) and
building from a config; the parameter groups each model declares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from msi.config import load_config
from msi.data.graph import interaction_csr, normalized_adjacency
from msi.models import MSI, LightGCN, build_model, grad_norms, lightgcn_readout
from msi.models.base import bipartite_blocks
from msi.runtime import open_run
from msi.train import train

# The paper's variants as constructor arguments (SPEC §2 table).
VARIANTS = {
    "MSI": {},
    "w/o S": {"use_ssd": False},
    "w/o I": {"use_ip": False},
    "w/o S&I (BM3)": {"use_ssd": False, "use_ip": False, "w_align": 2.0, "w_mask": 2.0},
    "w/o a": {"w_align": 0.0},
    "w/o m": {"w_mask": 0.0},
    "w/o a&m": {"w_align": 0.0, "w_mask": 0.0},
}
# 4 users, 3 items; every node has an edge
SMALL_TRAIN = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [3, 0], [3, 2]])
SMALL_USERS, SMALL_ITEMS = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([0, 1, 2, 0, 1])  # positive pairs


def make_msi(train, n_users, n_items, features, seed=0, embedding_dim=8, **kwargs) -> MSI:
    torch.manual_seed(seed)
    adj = normalized_adjacency(train, n_users, n_items)
    feats = {m: torch.as_tensor(f) for m, f in features.items()}
    return MSI(n_users, n_items, adj, feats, embedding_dim=embedding_dim, **kwargs)


def small_features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(3, 5, generator=g), "text": torch.randn(3, 4, generator=g)}


def tiny_msi(ds, **kwargs) -> MSI:
    return make_msi(ds.train, ds.n_users, ds.n_items, ds.features, embedding_dim=16, **kwargs)


def tiny_lightgcn(ds, **kwargs) -> LightGCN:
    torch.manual_seed(0)
    adj = normalized_adjacency(ds.train, ds.n_users, ds.n_items)
    return LightGCN(ds.n_users, ds.n_items, adj, ds.train, embedding_dim=16, **kwargs)


def dense_adjacency(train: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 written densely from its definition."""
    r = torch.zeros(n_users, n_items)
    r[train[:, 0], train[:, 1]] = 1.0
    a = torch.zeros(n_users + n_items, n_users + n_items)
    a[:n_users, n_users:], a[n_users:, :n_users] = r, r.T
    deg = a.sum(1)
    d = torch.where(deg > 0, deg.clamp(min=1).pow(-0.5), torch.zeros_like(deg))
    return d[:, None] * a * d[None, :]


def cos_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1 - ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).mean()


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------
# LightGCN propagation


def test_lightgcn_readout_exact_numbers():
    # K_{2,2}: every degree is 2, so every edge weighs 1/2. Nodes u0, u1, i0, i1.
    adj = normalized_adjacency(np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), 2, 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    # A x = [[1, 1], [1, 1], [.5, .5], [.5, .5]]; A^2 x = [[.5, .5], [.5, .5], [1, 1], [1, 1]]
    torch.testing.assert_close(lightgcn_readout(adj, x, 0), x)
    one = torch.tensor([[1.0, 0.5], [0.5, 1.0], [1.25, 0.25], [0.25, 1.25]])
    torch.testing.assert_close(lightgcn_readout(adj, x, 1), one)
    two = torch.tensor([[2.5, 1.5], [1.5, 2.5], [3.5, 1.5], [1.5, 3.5]]) / 3
    torch.testing.assert_close(lightgcn_readout(adj, x, 2), two)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_lightgcn_propagation_equals_dense_computation(n_layers):
    n_users, n_items = 4, 3
    model = LightGCN(n_users, n_items, normalized_adjacency(SMALL_TRAIN, n_users, n_items), SMALL_TRAIN,
                     embedding_dim=2, n_layers=n_layers)
    x = torch.arange(14, dtype=torch.float32).reshape(7, 2) / 10 - 0.3  # hand-made embedding
    with torch.no_grad():
        model.emb.copy_(x)
    a = dense_adjacency(SMALL_TRAIN, n_users, n_items)
    expected = sum(torch.linalg.matrix_power(a, k) @ x for k in range(n_layers + 1)) / (n_layers + 1)
    emb = model.embeddings()
    torch.testing.assert_close(emb["user"], expected[:n_users])
    torch.testing.assert_close(emb["id"], expected[n_users:])


def test_lightgcn_loss_is_bpr_plus_l2(monkeypatch):
    n_users, n_items = 4, 3
    model = LightGCN(n_users, n_items, normalized_adjacency(SMALL_TRAIN, n_users, n_items), SMALL_TRAIN,
                     embedding_dim=3, n_layers=1, gamma=0.5)
    neg = torch.tensor([2, 0, 0, 1, 2])  # none of them a train item of its user
    monkeypatch.setattr(model, "sample_negatives", lambda users: neg)
    a, x = dense_adjacency(SMALL_TRAIN, n_users, n_items), model.emb
    z = (x + a @ x) / 2
    u, i, j = z[SMALL_USERS], z[n_users + SMALL_ITEMS], z[n_users + neg]
    bpr = -torch.log(torch.sigmoid((u * i).sum(1) - (u * j).sum(1))).mean()
    reg = (x[SMALL_USERS].pow(2).sum() + x[n_users + SMALL_ITEMS].pow(2).sum() + x[n_users + neg].pow(2).sum()) / 10
    terms = model.loss(SMALL_USERS, SMALL_ITEMS)
    torch.testing.assert_close(terms["bpr"], bpr)
    torch.testing.assert_close(terms["reg"], reg)
    torch.testing.assert_close(terms["loss"], bpr + 0.5 * reg)


def test_lightgcn_negatives_avoid_train_items(tiny):
    model = tiny_lightgcn(tiny)
    torch.manual_seed(1)
    users = torch.from_numpy(tiny.train[:, 0]).repeat(20)
    neg = model.sample_negatives(users)
    train = {(int(u), int(i)) for u, i in tiny.train}
    assert not any((int(u), int(i)) in train for u, i in zip(users, neg))
    assert len(torch.unique(neg)) > tiny.n_items // 2  # spread over the catalogue, not one item


# ---------------------------------------------------------------------------------------------------------------
# The fused propagation of interaction preserving


class CountSparseMM:
    """Wraps torch.sparse.mm, recording the shape of every dense operand."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        original = torch.sparse.mm

        def mm(a, b):
            self.shapes.append(tuple(b.shape))
            return original(a, b)

        monkeypatch.setattr(torch.sparse, "mm", mm)


@pytest.mark.parametrize("use_ssd", [True, False])
def test_single_fused_product_equals_three_lightgcn_propagations(monkeypatch, use_ssd):
    n_users, n_items, d, n_layers = 4, 3, 8, 2
    model = make_msi(SMALL_TRAIN, n_users, n_items, small_features(), embedding_dim=d, n_layers=n_layers,
                     use_ssd=use_ssd).eval()
    adj = normalized_adjacency(SMALL_TRAIN, n_users, n_items)
    with torch.no_grad():
        ref = {}
        for view, items in [("id", model.item_emb)] + [
            (m, linear(model.proj[m], model.raw[m])) for m in model.modalities
        ]:
            if use_ssd and view != "id":
                items = linear(model.head[view], items)[:, :d]  # eval mode: z_r = mu
            z = lightgcn_readout(adj, torch.cat([model.user_emb, items]), n_layers)  # one graph at a time
            ref[view] = z[n_users:] + items  # item rows + the residual Z_0
            if view == "id":
                ref["user"] = z[:n_users]
        expected = {k: model.predictor(v) for k, v in ref.items()}
    calls = CountSparseMM(monkeypatch)
    emb = model.embeddings()
    assert calls.shapes == [(n_users + n_items, 3 * d)] * n_layers  # ONE product per layer, over N x 3d
    assert set(emb) == {"user", "id", "image", "text"}
    for k in expected:
        torch.testing.assert_close(emb[k], expected[k])


def test_bipartite_blocks_are_the_off_diagonal_blocks():
    adj = normalized_adjacency(SMALL_TRAIN, 4, 3)
    ui, iu = bipartite_blocks(adj, 4)
    dense = adj.to_dense()
    assert torch.equal(ui.to_dense(), dense[:4, 4:]) and torch.equal(iu.to_dense(), dense[4:, :4])
    assert bipartite_blocks(adj.to_sparse_coo(), 4) is None  # only CSR
    looped = (adj.to_dense() + torch.eye(7)).to_sparse_csr()  # a self-loop: not bipartite
    assert bipartite_blocks(looped, 4) is None


@pytest.mark.parametrize("kw", [{}, {"use_ssd": False}, {"use_ip": False, "use_ssd": False}])
def test_one_layer_readout_equals_the_stacked_product(monkeypatch, tiny, kw):
    """With one layer the readout runs as a U x d and an I x d product (base.one_layer_readout): the values, loss
    terms and gradients of the N x gd product of the general path, to float rounding (torch's CSR kernel may round
    a product of 16 columns differently from one of 48)."""
    model = tiny_msi(tiny, n_layers=1, **kw).train()
    assert model.blocks is not None
    users, items = torch.from_numpy(tiny.train[:64]).T

    def run(fast: bool):
        saved = model.adj_ui
        model.adj_ui = saved if fast else None
        try:
            torch.manual_seed(7)
            out, _, _ = model._propagate()
            torch.manual_seed(7)
            terms = model.loss(users, items)
        finally:
            model.adj_ui = saved
        return out, terms, grads(model, terms["loss"])

    calls = CountSparseMM(monkeypatch)
    fast_out, fast_terms, fast_grads = run(True)
    assert calls.shapes[:2] == [(tiny.n_users, 16), (tiny.n_items, 16)]  # Â_IU @ users, Â_UI @ item_emb
    slow_out, slow_terms, slow_grads = run(False)
    for k in slow_out:
        torch.testing.assert_close(fast_out[k], slow_out[k], rtol=1e-6, atol=1e-7, msg=k)
    for k in slow_terms:
        torch.testing.assert_close(fast_terms[k], slow_terms[k], rtol=1e-5, atol=1e-6, msg=k)
    assert fast_grads.keys() == slow_grads.keys()
    for k in slow_grads:
        torch.testing.assert_close(fast_grads[k], slow_grads[k], rtol=1e-5, atol=1e-7, msg=k)


def test_without_ip_only_the_id_graph_is_propagated(monkeypatch):
    d = 8
    model = make_msi(SMALL_TRAIN, 4, 3, small_features(), embedding_dim=d, n_layers=2, use_ssd=False,
                     use_ip=False).eval()
    calls = CountSparseMM(monkeypatch)
    emb = model.embeddings()
    assert calls.shapes == [(7, d)] * 2
    for m in ("image", "text"):  # z_s^m = z_r^m: the plain projection
        torch.testing.assert_close(emb[m], model.predictor(linear(model.proj[m], model.raw[m])).detach())


# ---------------------------------------------------------------------------------------------------------------
# Losses against dense re-computations


def bm3_reference(model: MSI, train: np.ndarray, users, items, gamma: float, cl_weight: float) -> dict:
    """BM3's loss (Zhou et al., WWW 2023, and its MMRec code) written densely; dropout 0, so targets = copies."""
    n_users, n_items = model.n_users, model.n_items
    a = dense_adjacency(train, n_users, n_items)
    ego = torch.cat([model.user_emb, model.item_emb])
    layers = [ego]
    for _ in range(model.n_layers):
        layers.append(a @ layers[-1])
    all_emb = torch.stack(layers, 1).mean(1)
    u_ori, i_ori = all_emb[:n_users], all_emb[n_users:] + model.item_emb  # item residual
    u_target, i_target = u_ori.detach(), i_ori.detach()

    def predictor(x):
        return linear(model.predictor, x)

    rec = cos_loss(predictor(u_ori)[users], i_target[items]) + cos_loss(predictor(i_ori)[items], u_target[users])
    align = mask = 0.0
    for m in ("image", "text"):
        feat_online = linear(model.proj[m], model.raw[m])  # BM3's image_trs / text_trs on trainable features
        feat_target = feat_online.detach()
        online = predictor(feat_online)[items]
        align = align + cos_loss(online, i_target[items])
        mask = mask + cos_loss(online, feat_target[items])
    reg = (u_ori.norm() + i_ori.norm()) / n_items  # EmbLoss: sum of norms / rows of the last matrix
    return {"rec": rec, "align": align, "mask": mask, "reg": reg,
            "loss": rec + gamma * reg + cl_weight * (align + mask)}


def test_bm3_variant_equals_dense_bm3():
    bm3 = VARIANTS["w/o S&I (BM3)"]
    model = make_msi(SMALL_TRAIN, 4, 3, small_features(), n_layers=2, dropout=0.0, gamma=0.1, **bm3)
    terms = model.loss(SMALL_USERS, SMALL_ITEMS)
    got_grads = grads(model, terms["loss"])
    ref = bm3_reference(model, SMALL_TRAIN, SMALL_USERS, SMALL_ITEMS, gamma=0.1, cl_weight=2.0)
    assert set(terms) == {"rec", "align", "mask", "reg", "loss"}  # no SSD terms without SSD
    for k in ref:
        torch.testing.assert_close(terms[k], ref[k], msg=k)
    ref_grads = grads(model, ref["loss"])
    assert set(got_grads) == set(ref_grads) and "raw.image" in got_grads  # features train, as in BM3
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], msg=name)


def msi_reference(model: MSI, train: np.ndarray, users, items) -> dict:
    """SPEC §2 written densely for eval mode (z_r = mu) and dropout 0, with explicitly detached targets."""
    n_users, n_items, d = model.n_users, model.n_items, model.user_emb.shape[1]
    a = dense_adjacency(train, n_users, n_items)

    def readout(x0):
        layers = [x0]
        for _ in range(model.n_layers):
            layers.append(a @ layers[-1])
        z = torch.stack(layers).mean(0)
        return z[:n_users], z[n_users:] + x0[n_users:]

    codes, mus, sigmas = {}, {}, {}
    for m in model.modalities:
        h = linear(model.proj[m], model.raw[m])
        if model.use_ssd:
            out = linear(model.head[m], h)
            mus[m], sigmas[m] = out[:, :d], F.softplus(out[:, d:]) + 1e-6
            h = mus[m]
        codes[m] = h
    z_u, z_i = readout(torch.cat([model.user_emb, model.item_emb]))
    z_m = {m: readout(torch.cat([model.user_emb, codes[m]]))[1] if model.use_ip else codes[m] for m in codes}

    def predictor(x):
        return linear(model.predictor, x)

    u, i = z_u[users], z_i[items]
    u_hat, i_hat = u.detach(), i.detach()
    out = {"rec": cos_loss(predictor(u), i_hat) + cos_loss(predictor(i), u_hat), "align": 0.0, "mask": 0.0}
    for m in model.modalities:
        zm = z_m[m][items]
        out["align"] = out["align"] + cos_loss(predictor(zm), i_hat)
        out["mask"] = out["mask"] + cos_loss(predictor(zm), zm.detach())
    mats = [z_u, z_i] + (list(z_m.values()) if model.use_ip else [])
    out["reg"] = sum(x.norm() for x in mats) / n_items
    out["loss"] = out["rec"] + model.w_align * out["align"] + model.w_mask * out["mask"] + model.gamma * out["reg"]
    if model.use_ssd:
        uniq = torch.unique(items)
        t, v = model.modalities
        za, zb = F.normalize(codes[t][uniq], dim=-1), F.normalize(codes[v][uniq], dim=-1)
        logits, target = za @ zb.T / model.tau, torch.arange(len(uniq))
        out["nce"] = math.log(len(uniq)) - (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        p = Independent(Normal(mus[t][uniq], sigmas[t][uniq]), 1)
        q = Independent(Normal(mus[v][uniq], sigmas[v][uniq]), 1)
        out["akl"] = ((kl_divergence(p, q) + kl_divergence(q, p)) / 2).mean()
        out["ssd"] = -out["nce"] + model.beta * out["akl"]
        out["loss"] = out["loss"] + model.alpha * out["ssd"]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_equals_dense_msi_with_detached_targets(variant):
    """Loss terms and gradients match SPEC §2 written densely. The reference detaches every target view, so
    the gradients differ if a target view lets gradient through (the stop-gradient of the CVG)."""
    model = make_msi(SMALL_TRAIN, 4, 3, small_features(), n_layers=2, dropout=0.0, alpha=0.5, beta=0.3,
                     gamma=0.2, **VARIANTS[variant]).eval()  # eval: z_r = mu, deterministic
    terms = model.loss(SMALL_USERS, SMALL_ITEMS)
    got_grads = grads(model, terms["loss"])
    ref = msi_reference(model, SMALL_TRAIN, SMALL_USERS, SMALL_ITEMS)
    assert set(terms) == set(ref)
    for k in ref:
        torch.testing.assert_close(terms[k], ref[k], msg=k)
    ref_grads = grads(model, ref["loss"])
    assert set(got_grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], msg=name)


def test_stop_gradient_with_dropout_on(monkeypatch, tiny):
    """Training mode, dropout 0.5: every dropout output is gradient-free, and the gradients equal those of a
    run (same random numbers) whose dropout outputs are detached explicitly."""
    model = tiny_msi(tiny, dropout=0.5).train()
    users, items = torch.from_numpy(tiny.train[:64, 0]), torch.from_numpy(tiny.train[:64, 1])
    original = F.dropout
    seen = []

    def recording(x, p=0.5, training=True, inplace=False):
        out = original(x, p, training, inplace)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(F, "dropout", recording)
    torch.manual_seed(3)
    got = grads(model, model.loss(users, items)["loss"])
    assert len(seen) == 4 and not any(seen)  # u^, i^, and one target per modality

    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False: original(x, p, training).detach())
    torch.manual_seed(3)
    expected = grads(model, model.loss(users, items)["loss"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_frozen_features_get_no_gradient(tiny):
    model = tiny_msi(tiny, freeze_features=True)
    model.loss(torch.tensor([0, 1]), torch.tensor([0, 1]))["loss"].backward()
    assert all(model.raw[m].grad is None and not model.raw[m].requires_grad for m in model.modalities)
    assert model.proj["image"].weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# Training, determinism, scoring, recommending


def _train(model, ds, steps: int = 50, lr: float = 1e-2, batch: int = 256) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    pairs = torch.from_numpy(ds.train)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=g)
        loss = model.loss(pairs[idx, 0], pairs[idx, 1])["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", [*VARIANTS, "LightGCN"])
def test_each_variant_trains_with_a_falling_loss(tiny, variant):
    model = tiny_lightgcn(tiny, gamma=1e-4) if variant == "LightGCN" else tiny_msi(tiny, **VARIANTS[variant])
    losses = _train(model, tiny)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first, f"{variant}: mean loss {first:.4f} over the first 5 steps, {last:.4f} over the last 5"


@pytest.mark.parametrize("variant", ["MSI", "LightGCN"])
def test_eval_mode_is_deterministic(tiny, variant):
    model = tiny_lightgcn(tiny) if variant == "LightGCN" else tiny_msi(tiny, dropout=0.5)
    users = torch.arange(tiny.n_users)
    model.eval()
    first, second = model.embeddings(), model.embeddings()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert torch.equal(model.score(users), model.score(users))
    assert torch.equal(model.recommend(users, 5)[1], model.recommend(users, 5)[1])


def test_training_mode_samples_the_ssd_codes(tiny):
    model = tiny_msi(tiny).train()  # z_r = mu + sigma * eps: two calls differ; eval mode above does not
    assert not torch.equal(model.embeddings()["image"], model.embeddings()["image"])


def test_score_with_each_item_view(tiny):
    model = tiny_msi(tiny).eval()
    users = torch.tensor([0, 3, 5])
    emb = model.embeddings()
    assert model.item_views == ("id", "image", "text")
    for view in model.item_views:
        scores = model.score(users, item_view=view)
        assert scores.shape == (3, tiny.n_items)
        torch.testing.assert_close(scores, emb["user"][users] @ emb[view].T)
    assert not torch.allclose(model.score(users, "image"), model.score(users, "id"))
    with pytest.raises(ValueError, match="unknown item view 'audio'; this model has id, image, text"):
        model.score(users, item_view="audio")
    with pytest.raises(ValueError, match="unknown item view 'image'"):
        tiny_lightgcn(tiny).score(users, item_view="image")


@pytest.mark.parametrize("variant", ["MSI", "LightGCN"])
def test_recommend_never_returns_excluded_items(tiny, variant):
    model = (tiny_lightgcn(tiny) if variant == "LightGCN" else tiny_msi(tiny)).eval()
    exclude = interaction_csr(tiny.train, tiny.n_users, tiny.n_items)
    users = torch.arange(tiny.n_users)
    k = 5
    scores, items = model.recommend(users, k, exclude=exclude)
    assert items.shape == scores.shape == (tiny.n_users, k)
    seen = exclude.to_dense().bool()
    assert not seen[users[:, None], items].any()
    # the top k of the scores with the seen items removed, by brute force
    full = model.score(users)
    full[seen] = float("-inf")
    torch.testing.assert_close(scores, torch.topk(full, k, dim=1).values)
    # without the mask, seen items are recommended (the mask is what removes them)
    assert seen[users[:, None], model.recommend(users, k)[1]].any()
    # k larger than the catalogue is clamped
    assert model.recommend(users[:2], tiny.n_items + 10)[1].shape == (2, tiny.n_items)


def test_recommend_user_subset_and_modality_view(tiny):
    model = tiny_msi(tiny).eval()
    exclude = interaction_csr(tiny.train, tiny.n_users, tiny.n_items)
    users = torch.tensor([7, 2, 7])
    scores, items = model.recommend(users, 4, exclude=exclude, item_view="text")
    seen = exclude.to_dense().bool()
    assert not seen[users[:, None], items].any()
    assert torch.equal(items[0], items[2])


# ---------------------------------------------------------------------------------------------------------------
# Construction


def test_ssd_needs_exactly_two_modalities(tiny):
    one = {"image": tiny.features["image"]}
    with pytest.raises(ValueError, match="use_ssd needs exactly two modalities, got 1"):
        make_msi(tiny.train, tiny.n_users, tiny.n_items, one)
    three = {**tiny.features, "audio": tiny.features["text"]}
    with pytest.raises(ValueError, match="use_ssd needs exactly two modalities, got 3"):
        make_msi(tiny.train, tiny.n_users, tiny.n_items, three)
    model = make_msi(tiny.train, tiny.n_users, tiny.n_items, one, use_ssd=False)
    assert model.item_views == ("id", "image")
    assert torch.isfinite(model.loss(torch.tensor([0]), torch.tensor([1]))["loss"])
    with pytest.raises(ValueError, match="at least one modality"):
        make_msi(tiny.train, tiny.n_users, tiny.n_items, {}, use_ssd=False)
    with pytest.raises(ValueError, match="rows, expected n_items"):
        make_msi(tiny.train, tiny.n_users, tiny.n_items, {"image": np.zeros((3, 2), np.float32)}, use_ssd=False)


@pytest.mark.parametrize(
    "overrides, expected",
    [([], {"use_ssd": True, "use_ip": True, "w_align": 1.0, "w_mask": 1.0}),
     (["model.use_ssd=false"], {"use_ssd": False, "use_ip": True}),
     (["model.use_ip=false"], {"use_ssd": True, "use_ip": False}),
     (["model.use_ssd=false", "model.use_ip=false", "loss.w_align=2.0", "loss.w_mask=2.0"],
      {"use_ssd": False, "use_ip": False, "w_align": 2.0, "w_mask": 2.0}),
     (["loss.w_align=0"], {"w_align": 0.0, "w_mask": 1.0}),
     (["loss.w_mask=0"], {"w_align": 1.0, "w_mask": 0.0}),
     (["loss.w_align=0", "loss.w_mask=0", "loss.alpha=0.01", "model.tau=0.5", "model.n_layers=3"],
      {"w_align": 0.0, "w_mask": 0.0, "alpha": 0.01, "tau": 0.5, "n_layers": 3})],
)
def test_build_model_builds_each_variant(tiny, overrides, expected):
    cfg = load_config(overrides=["model.embedding_dim=8", *overrides])
    model = build_model(cfg, tiny)
    assert isinstance(model, MSI) and model.user_emb.shape == (tiny.n_users, 8)
    for key, value in expected.items():
        assert getattr(model, key) == value, key
    assert model.modalities == tuple(tiny.features)
    # zeros for the feature values (for the parameter shapes): same parameters, same scores after loading
    bare = build_model(cfg, tiny, with_features=False)
    bare.load_state_dict(model.state_dict())
    users = torch.arange(4)
    assert torch.equal(bare.eval().score(users), model.eval().score(users))


def test_build_model_builds_lightgcn(tiny):
    cfg = load_config(overrides=["model.name=lightgcn", "model.embedding_dim=8", "model.n_layers=2",
                                 "loss.gamma=1e-4"])
    model = build_model(cfg, tiny)
    assert isinstance(model, LightGCN)
    assert (model.n_layers, model.gamma, model.emb.shape) == (2, 1e-4, (tiny.n_users + tiny.n_items, 8))
    assert model.item_views == ("id",)


SEEN_MODELS = {"msi": [], "lightgcn": ["model.name=lightgcn"]}


@pytest.mark.parametrize("name", list(SEEN_MODELS))
def test_a_built_model_leaves_out_train_items_unless_told_not_to(tiny, name):
    model = build_model(load_config(overrides=["model.embedding_dim=8", *SEEN_MODELS[name]]), tiny).eval()
    train_mask = interaction_csr(tiny.train, tiny.n_users, tiny.n_items)
    assert torch.equal(model.seen.to_dense(), train_mask.to_dense()) and "seen" not in model.state_dict()
    users, k = torch.arange(tiny.n_users), 5
    seen = train_mask.to_dense().bool()
    scores, items = model.recommend(users, k)
    assert not seen[users[:, None], items].any()
    full = model.score(users)
    torch.testing.assert_close(scores, torch.topk(full.masked_fill(seen, float("-inf")), k, dim=1).values)
    # exclude_seen=False: the plain top k, train items among them
    raw_scores, raw = model.recommend(users, k, exclude_seen=False)
    assert torch.equal(raw_scores, torch.topk(full, k, dim=1).values) and seen[users[:, None], raw].any()
    # an explicit mask is left out instead of the train items (msi-recommend's train + valid)
    valid = interaction_csr(tiny.valid, tiny.n_users, tiny.n_items).to_dense().bool()
    _, items = model.recommend(users, k, exclude=interaction_csr(tiny.valid, tiny.n_users, tiny.n_items))
    assert not valid[users[:, None], items].any()
    # a model constructed directly knows no train items and leaves out nothing
    assert tiny_msi(tiny).seen is None and tiny_lightgcn(tiny).seen is None


def test_a_model_opened_by_open_run_leaves_out_train_items(tiny, tmp_path):
    cfg = load_config(overrides=[f"data.root={tiny.path.parent}", f"data.name={tiny.name}", "train.epochs=1",
                                 "model.embedding_dim=8", "train.device=cpu"])
    train(cfg, out=tmp_path / "run", quiet=True, data=tiny)
    model = open_run(tmp_path / "run" / "best.pt", dataset=tiny).model
    users = torch.arange(tiny.n_users)
    seen = interaction_csr(tiny.train, tiny.n_users, tiny.n_items).to_dense().bool()
    assert not seen[users[:, None], model.recommend(users, 5)[1]].any()
    assert seen[users[:, None], model.recommend(users, 5, exclude_seen=False)[1]].any()


@pytest.mark.parametrize("overrides", [[], ["model.use_ssd=false"], ["model.mi_estimator=jsd"],
                                       ["model.name=lightgcn"]])
def test_every_parameter_is_in_a_group_the_model_declares(tiny, overrides):
    model = build_model(load_config(overrides=["model.embedding_dim=8", *overrides]), tiny).train()
    assert {name.split(".")[0] for name, _ in model.named_parameters()} <= set(model.param_groups)
    model.loss(torch.from_numpy(tiny.train[:32, 0]), torch.from_numpy(tiny.train[:32, 1]))["loss"].backward()
    norms = grad_norms(model)
    assert "grad_other" not in norms and norms["grad_embeddings"] > 0
    if isinstance(model, LightGCN):
        assert norms == {"grad_embeddings": pytest.approx(float(model.emb.grad.norm()), rel=1e-6)}


def test_symmetric_backward_equals_torch_sparse_backward():
    """The readout's own backward (Â @ G, Â symmetric) gives torch's transpose-based gradient bit for bit."""
    rng = np.random.default_rng(3)
    pairs = np.stack([rng.integers(0, 30, 200), rng.integers(0, 20, 200)], axis=1)
    adj = normalized_adjacency(pairs, 30, 20)
    x = torch.randn(50, 6, dtype=torch.float32)
    grad = torch.randn(50, 6)
    a = x.clone().requires_grad_()
    (lightgcn_readout(adj, a, 2) * grad).sum().backward()
    b = x.clone().requires_grad_()
    out = z = b
    for _ in range(2):
        z = torch.sparse.mm(adj, z)
        out = out + z
    (out / 3 * grad).sum().backward()
    assert torch.equal(a.grad, b.grad)

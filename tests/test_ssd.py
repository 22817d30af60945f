"""SSD as it trains: the scale-row initialisation, the code placement, the beta warm-up and the code statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msi.config import load_config
from msi.errors import ConfigError
from msi.models import MSI, epoch_diagnostics, grad_norms
from msi.train import make_optimizer
from tests.test_models import make_msi, tiny_msi


def loud_features(ds, norm: float = 33.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unnormalised features like TikTok's image rows: the tiny set's features rescaled to row norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, f in ds.features.items():
        x = torch.as_tensor(f) + 3.0 * torch.rand(f.shape, generator=g)  # a positive offset, as CNN features have
        out[m] = x * (norm / x.norm(dim=1, keepdim=True))
    return out


def test_scale_rows_start_at_zero_so_sigma_starts_at_softplus_zero(tiny):
    model = tiny_msi(tiny)
    d = model.user_emb.shape[1]
    for m in model.modalities:
        w = model.head[m].weight
        assert torch.count_nonzero(w[d:]) == 0 and torch.count_nonzero(model.head[m].bias) == 0
        assert torch.count_nonzero(w[:d]) == w[:d].numel()  # the mean rows keep their Xavier draw
    stats = model.code_stats()
    for m in model.modalities:
        assert stats[f"sigma_{m}"] == pytest.approx(np.log(2.0) + 1e-6, rel=1e-6)


def test_sigma_init_sets_every_starting_sigma(tiny):
    model = tiny_msi(tiny, sigma_init=0.01)
    d = model.user_emb.shape[1]
    model.eval()
    _, gauss = model._modality_codes()
    for m in model.modalities:
        torch.testing.assert_close(gauss[m][1], torch.full_like(gauss[m][1], 0.01 + 1e-6))  # every item, every dim
        assert torch.count_nonzero(model.head[m].weight[d:]) == 0
        assert torch.count_nonzero(model.head[m].bias[:d]) == 0  # the mean rows' bias stays at zero
    default, same = tiny_msi(tiny), tiny_msi(tiny, sigma_init=float(np.log(2.0)))  # ln 2 is the default, exactly
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), same.state_dict().values()))


def test_identity_head_starts_with_mu_equal_to_the_projection(tiny):
    model = tiny_msi(tiny, head_init="identity").eval()
    base = tiny_msi(tiny).eval()
    _, gauss = model._modality_codes()
    for m in model.modalities:
        h = model.proj[m](model.raw[m])
        torch.testing.assert_close(gauss[m][0], h, rtol=0, atol=0)  # mu = I h + 0
        torch.testing.assert_close(model.proj[m].weight, base.proj[m].weight)  # the same draws everywhere else
    assert model.code_stats()["sigma_image"] == pytest.approx(np.log(2.0) + 1e-6, rel=1e-6)


def test_sigma_init_and_head_init_are_checked_keys():
    with pytest.raises(ConfigError, match=r"'model\.sigma_init' must be > 0 \(got 0\.0\)"):
        load_config(overrides=["model.sigma_init=0"])
    with pytest.raises(ConfigError, match=r"'model\.head_init' must be one of xavier, identity"):
        load_config(overrides=["model.head_init=eye"])
    cfg = load_config(overrides=["model.sigma_init=0.01", "model.head_init=identity"])
    assert (cfg.model.sigma_init, cfg.model.head_init) == (0.01, "identity")


def test_akl_at_initialisation_is_no_larger_than_the_other_terms_on_loud_features(tiny):
    """Row norms of 33: the AKL term must not dominate the first steps (it was ~35x the rest with a Xavier scale
    head, which froze the projections' Adam state)."""
    feats = loud_features(tiny)
    assert min(float(f.norm(dim=1).min()) for f in feats.values()) >= 30
    for seed in range(3):
        model = make_msi(tiny.train, tiny.n_users, tiny.n_items, feats, seed=seed, embedding_dim=64).train()
        users, items = torch.from_numpy(tiny.train[:256, 0]), torch.from_numpy(tiny.train[:256, 1])
        t = model.loss(users, items)
        others = t["rec"] + model.w_align * t["align"] + model.w_mask * t["mask"] + model.gamma * t["reg"]
        assert model.alpha * model.beta * t["akl"] <= others, (seed, float(t["akl"]))


def test_projections_get_adam_updates_of_ordinary_size_after_a_few_dozen_steps(tiny):
    """The median |Adam step| / lr of proj.* stays above 0.05 (it fell to ~4e-4 after the AKL spike)."""
    feats = loud_features(tiny)
    model = make_msi(tiny.train, tiny.n_users, tiny.n_items, feats, seed=0, embedding_dim=64).train()
    lr = 1e-3
    opt = make_optimizer(model, lr)
    pairs = torch.from_numpy(tiny.train)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = pairs[torch.randint(len(pairs), (128,), generator=g)]
        opt.zero_grad(set_to_none=True)
        model.loss(batch[:, 0], batch[:, 1])["loss"].backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("proj.")}
        opt.step()
    for name, old in before.items():
        step = (dict(model.named_parameters())[name].detach() - old).abs() / lr
        assert step.median() > 0.05, (name, float(step.median()))


def ssd_terms_twice(model: MSI, ds, seeds=(1, 2)) -> list[dict[str, torch.Tensor]]:
    """The loss terms of the first 64 train pairs, once per seed."""
    users, items = torch.from_numpy(ds.train[:64, 0]), torch.from_numpy(ds.train[:64, 1])
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.detach() for k, v in model.loss(users, items).items()})
    return out


def test_mean_placement_feeds_the_means_downstream_and_samples_only_into_l_ssd(tiny):
    """dropout 0 leaves eps as the only randomness: with "mean" only the SSD terms move with it."""
    model = tiny_msi(tiny, dropout=0.0, code_placement="mean").train()
    a, b = ssd_terms_twice(model, tiny)
    for k in ("rec", "align", "mask", "reg", "akl"):
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert a["nce"] != b["nce"]
    sample = tiny_msi(tiny, dropout=0.0, code_placement="sample").train()
    a, b = ssd_terms_twice(sample, tiny)
    assert a["align"] != b["align"] and a["nce"] != b["nce"]  # the samples reach the graphs and every loss


def test_both_placements_score_alike_in_eval_mode(tiny):
    emb = [tiny_msi(tiny, code_placement=p).eval().embeddings() for p in ("sample", "mean")]
    for k in emb[0]:
        torch.testing.assert_close(emb[0][k], emb[1][k], msg=k)


@pytest.mark.parametrize(("warmup", "epoch", "fraction"), [(0, 0, 1.0), (4, 0, 0.0), (4, 1, 0.25), (4, 4, 1.0),
                                                            (4, 9, 1.0)])
def test_beta_warmup_rises_linearly_from_zero(tiny, warmup, epoch, fraction):
    model = tiny_msi(tiny, beta=0.5, beta_warmup=warmup).eval()
    model.start_epoch(epoch)
    t = model.loss(torch.from_numpy(tiny.train[:32, 0]), torch.from_numpy(tiny.train[:32, 1]))
    torch.testing.assert_close(t["ssd"], -t["nce"] + 0.5 * fraction * t["akl"])


def test_placement_and_warmup_are_config_keys_with_faithful_defaults():
    cfg = load_config(None, [])
    assert (cfg.model.code_placement, cfg.loss.beta_warmup) == ("sample", 0)
    cfg = load_config(None, ["model.code_placement=mean", "loss.beta_warmup=10"])
    assert (cfg.model.code_placement, cfg.loss.beta_warmup) == ("mean", 10)
    with pytest.raises(ConfigError, match="model.code_placement"):
        load_config(None, ["model.code_placement=samples"])
    with pytest.raises(ConfigError, match="loss"):
        load_config(None, ["loss.beta_warmup=-1"])


def test_code_stats_tell_paired_codes_from_random_pairs(tiny):
    """Identical modality features give identical codes only if the maps agree; with one shared map and one
    feature matrix for both modalities every item's codes coincide: cos_pair = 1 > cos_random."""
    f = torch.as_tensor(tiny.features["image"])
    model = make_msi(tiny.train, tiny.n_users, tiny.n_items, {"image": f, "text": f.clone()}, embedding_dim=16)
    model.proj["text"].load_state_dict(model.proj["image"].state_dict())
    model.head["text"].load_state_dict(model.head["image"].state_dict())
    rng_before = torch.get_rng_state()
    stats = model.code_stats()
    assert torch.equal(rng_before, torch.get_rng_state())  # diagnostics never move the training RNG
    assert stats["cos_pair"] == pytest.approx(1.0, abs=1e-5)
    assert stats["cos_random"] < 0.99


def test_grad_norms_by_parameter_group(tiny):
    model = tiny_msi(tiny).train()
    assert grad_norms(model) == {}
    model.loss(torch.from_numpy(tiny.train[:32, 0]), torch.from_numpy(tiny.train[:32, 1]))["loss"].backward()
    norms = epoch_diagnostics(model)
    expected = {"grad_embeddings", "grad_projections", "grad_heads", "grad_predictor", "grad_features"}
    assert expected <= set(norms) and all(norms[k] > 0 for k in expected)
    manual = sum(float(p.grad.pow(2).sum()) for p in model.proj.parameters()) ** 0.5
    assert norms["grad_projections"] == pytest.approx(manual, rel=1e-5)
    assert {"sigma_image", "sigma_text", "cos_pair", "cos_random"} <= set(norms)


def test_jsd_estimator_uses_a_trained_critic_on_the_batch_items(tiny):
    """mi_estimator "jsd": L_ssd = -JSD(critic on (a_i, b_i) vs (a_{i-1}, b_i)) + beta * AKL over the distinct batch
    items, the critic gets gradients, and the InfoNCE model has no critic."""
    assert not hasattr(tiny_msi(tiny), "critic")
    model = tiny_msi(tiny, mi_estimator="jsd", beta=0.5).eval()  # eval: codes = mu, deterministic
    users, items = torch.from_numpy(tiny.train[:40, 0]), torch.from_numpy(tiny.train[:40, 1])
    t = model.loss(users, items)
    assert "jsd" in t and "nce" not in t
    _, _, gauss = model._propagate()
    uniq = torch.unique(items)
    za, zb = (gauss[m][2][uniq] for m in model.modalities)
    pos = model.critic(torch.cat([za, zb], 1)).squeeze(1)
    neg = model.critic(torch.cat([torch.cat([za[-1:], za[:-1]]), zb], 1)).squeeze(1)
    want = -torch.nn.functional.softplus(-pos).mean() - torch.nn.functional.softplus(neg).mean()
    torch.testing.assert_close(t["jsd"], want)
    torch.testing.assert_close(t["ssd"], -t["jsd"] + 0.5 * t["akl"])
    t["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())
    assert "grad_critic" in grad_norms(model)


def test_score_views_all_adds_the_modality_views_for_scoring_only(tiny):
    base, both = tiny_msi(tiny).eval(), tiny_msi(tiny, score_views="all").eval()
    e0, e1 = base.embeddings(), both.embeddings()
    torch.testing.assert_close(e1["id"], e0["id"] + sum(e0[m] for m in base.modalities))
    for k in ("user", *base.modalities):
        torch.testing.assert_close(e1[k], e0[k], msg=k)
    l0, l1 = (ssd_terms_twice(m, tiny, seeds=(5,))[0] for m in (base, both))  # the same dropout masks
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], msg=k)
    torch.testing.assert_close(both.score(torch.arange(3)), e1["user"][:3] @ e1["id"].T)


def test_estimator_and_score_views_are_config_keys_with_faithful_defaults(tiny):
    cfg = load_config(None, [])
    assert (cfg.model.mi_estimator, cfg.model.score_views) == ("infonce", "id")
    cfg = load_config(None, ["model.mi_estimator=jsd", "model.score_views=all"])
    assert (cfg.model.mi_estimator, cfg.model.score_views) == ("jsd", "all")
    for bad in ("model.mi_estimator=mine", "model.score_views=both"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])

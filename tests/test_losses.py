"""msi.losses: every loss term against a closed form, a hand computation or torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from msi.losses import average_kl, bpr_loss, cosine_loss, frobenius_reg, gaussian_kl, info_nce, jsd_mi


def _gaussians(b: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    s1 = torch.rand(b, d, generator=g, dtype=torch.float64) * 2 + 0.1
    s2 = torch.rand(b, d, generator=g, dtype=torch.float64) * 2 + 0.1
    return mu1, s1, mu2, s2


@pytest.mark.parametrize("b, d, seed", [(1, 1, 0), (5, 3, 1), (32, 64, 2)])
def test_gaussian_kl_matches_torch_distributions(b, d, seed):
    mu1, s1, mu2, s2 = _gaussians(b, d, seed)
    p, q = Independent(Normal(mu1, s1), 1), Independent(Normal(mu2, s2), 1)
    torch.testing.assert_close(gaussian_kl(mu1, s1, mu2, s2), kl_divergence(p, q))


@pytest.mark.parametrize("b, d, seed", [(1, 1, 3), (5, 3, 4), (32, 64, 5)])
def test_average_kl_matches_torch_distributions(b, d, seed):
    mu1, s1, mu2, s2 = _gaussians(b, d, seed)
    p, q = Independent(Normal(mu1, s1), 1), Independent(Normal(mu2, s2), 1)
    expected = (0.5 * (kl_divergence(p, q) + kl_divergence(q, p))).mean()
    got = average_kl(mu1, s1, mu2, s2)
    assert got.shape == ()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(average_kl(mu2, s2, mu1, s1), got)  # symmetric


def test_average_kl_hand_value():
    # N(0, 1) vs N(1, 2^2) in one dimension: KL(p||q) = log 2 + (1 + 1)/8 - 1/2, KL(q||p) = -log 2 + (4 + 1)/2 - 1/2
    mu1, s1, mu2, s2 = (torch.tensor([[v]]) for v in (0.0, 1.0, 1.0, 2.0))
    expected = 0.5 * ((math.log(2) + 0.25 - 0.5) + (-math.log(2) + 2.5 - 0.5))
    assert average_kl(mu1, s1, mu2, s2).item() == pytest.approx(expected, abs=1e-6)  # = 0.875
    assert average_kl(mu1, s1, mu1, s1).item() == 0.0


def test_info_nce_hand_value():
    # B = 2 orthonormal codes, tau = 1: logits [[1, 0], [0, 1]], CE = log(1 + e^-1) both ways
    a = torch.eye(2)
    assert info_nce(a, a, 1.0).item() == pytest.approx(math.log(2) - math.log(1 + math.exp(-1)), abs=1e-6)
    assert info_nce(3 * a, a, 1.0).item() == pytest.approx(0.3798855, abs=1e-6)  # cosine: scale-free


def test_info_nce_identical_codes_approach_log_b_from_below():
    g = torch.Generator().manual_seed(0)
    b = 16
    a = torch.randn(b, 64, generator=g, dtype=torch.float64)
    values = [info_nce(a, a, tau).item() for tau in (1.0, 0.2, 0.05)]
    assert all(v < math.log(b) for v in values)  # the estimate is bounded by log B
    assert values[0] < values[1] < values[2]  # sharper positives as tau falls
    assert math.log(b) - values[2] < 1e-3  # tau = 0.05: within 1e-3 of log 16 = 2.7726


def test_info_nce_unrelated_codes_are_near_zero():
    # independent codes: logits ~ N(0, (1/d) / tau^2), so I_NCE ~ -var/2 = -0.012 here; bound |I_NCE| < 0.1
    g = torch.Generator().manual_seed(1)
    b, d = 256, 1024
    a, c = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    value = info_nce(a, c, 0.2).item()
    assert abs(value) < 0.1
    # the same codes: positive logit 1/tau = 5, negatives ~ 0, so I_NCE ~ log B - log(1 + (B - 1) e^-5) = 4.55
    expected = math.log(b) - math.log(1 + (b - 1) * math.exp(-5))
    assert info_nce(a, a, 0.2).item() == pytest.approx(expected, abs=0.02)


def test_info_nce_is_symmetric_in_its_arguments():
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    torch.testing.assert_close(info_nce(a, c, 0.3), info_nce(c, a, 0.3))


def test_cosine_loss_hand_values():
    x = torch.tensor([[1.0, 0.0]])
    assert cosine_loss(x, torch.tensor([[0.0, 3.0]])).item() == pytest.approx(1.0)  # orthogonal
    assert cosine_loss(x, torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.0)  # same direction
    assert cosine_loss(x, torch.tensor([[-5.0, 0.0]])).item() == pytest.approx(2.0)  # opposite
    # averaged over rows: cos = 1, 0, -1, 1/sqrt(2) -> 1 - (1 + 0 - 1 + 0.70711) / 4
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    assert cosine_loss(a, b).item() == pytest.approx(1 - (1 / math.sqrt(2)) / 4, abs=1e-6)


def test_bpr_loss_known_values():
    assert bpr_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-2) = log(1 + e^2) = 2.1269280
    got = bpr_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).item()
    assert got == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)


def test_frobenius_reg():
    a = torch.tensor([[3.0, 4.0]])  # norm 5
    b = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # norm 5
    assert frobenius_reg(a, b, denominator=4).item() == pytest.approx(2.5)


def test_info_nce_equals_the_cross_entropy_formulation_value_and_gradient():
    """The log-sum-exp form against the textbook one (the implementation before it): (B, B) logits, cross-entropy
    of rows and of columns."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.2
    target = torch.arange(50)
    want = math.log(50) - 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    got = info_nce(a, b, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for x, y in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(want, (a, b))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def _lse_info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """The per-row-maximum log-sum-exp form (the implementation before the shared exp)."""
    logits = (F.normalize(a, dim=-1) / tau) @ F.normalize(b, dim=-1).T
    lse = torch.logsumexp(logits, 1) + torch.logsumexp(logits, 0)
    return math.log(a.shape[0]) - (0.5 * lse.mean() - logits.diagonal().mean())


@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_exp_info_nce_equals_the_log_sum_exp_form(tau, dtype):
    g = torch.Generator().manual_seed(1)
    a0 = torch.randn(300, 32, generator=g, dtype=dtype)
    b0 = 0.5 * a0 + torch.randn(300, 32, generator=g, dtype=dtype)  # positives more alike than negatives
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    got, want = info_nce(a, b, tau), _lse_info_nce(a2, b2, tau)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, want, **tol)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, a2.grad, **tol)
    torch.testing.assert_close(b.grad, b2.grad, **tol)


def test_shared_exp_info_nce_gradcheck_and_small_tau_fallback(monkeypatch):
    from msi import losses

    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: losses._SharedExpNCE.apply(x, y, 3.0), (a, b))
    # below tau = 0.05 the shared shift could underflow: the per-row-maximum form runs, and stays finite
    monkeypatch.setattr(losses._SharedExpNCE, "apply", lambda *args: pytest.fail("shared exp used at tau 0.01"))
    x = torch.randn(64, 8, generator=g)
    value = info_nce(x, x + 0.01 * torch.randn(64, 8, generator=g), 0.01)
    assert torch.isfinite(value) and value <= math.log(64) + 1e-5


def test_jsd_mi_hand_values():
    """A critic that cannot tell pairs from others (all scores 0) gives -2 log 2; a perfect one approaches 0."""
    zeros = torch.zeros(5)
    assert float(jsd_mi(zeros, zeros)) == pytest.approx(-2 * math.log(2.0))
    assert float(jsd_mi(torch.full((5,), 30.0), torch.full((5,), -30.0))) == pytest.approx(0.0, abs=1e-12)
    pos, neg = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    want = -(F.softplus(-pos).mean() + F.softplus(neg).mean())
    assert float(jsd_mi(pos, neg)) == pytest.approx(float(want))

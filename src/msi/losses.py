"""The loss terms of MSI, BM3 and LightGCN as plain functions on tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C(x, y) = 1 - cos(x, y), averaged over the rows of (B, d) inputs."""
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()


# 1/tau up to which info_nce uses one shared exp: exp(logit - 1/tau) then lies in [exp(-2/tau), 1], far from
# float32's underflow (exp(-87)) for 1/tau <= 20
_SHARED_EXP_MAX_INV_TAU = 20.0


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE estimate I_NCE(a; b) = log B - CE, for paired codes a, b of shape (B, d).

    Logits are cosine similarities / tau; row i of ``a`` and row i of ``b`` are the positive pair, the other rows
    the negatives; the cross-entropy is averaged over both directions. The estimate lies in (-inf, log B].
    CE of row i = logsumexp_j(logits_ij) - logits_ii, and the same over column i.

    The logits are bounded by 1/tau (cosines lie in [-1, 1]), so for tau >= 0.05 the row and column log-sum-exps
    share one exp shifted by that bound instead of each shifting by its own maximum (``_SharedExpNCE``: one
    exp over the (B, B) logits where the two log-sum-exps take two each, and a backward of two passes); the value
    equals the per-row-maximum form up to float rounding. Smaller tau, and bfloat16 autocast, use the latter.
    """
    an, bn = F.normalize(a, dim=-1) / tau, F.normalize(b, dim=-1)
    if 1.0 / tau <= _SHARED_EXP_MAX_INV_TAU and not torch.is_autocast_enabled(a.device.type):
        ce = _SharedExpNCE.apply(an, bn, 1.0 / tau)
    else:
        logits = an @ bn.T  # (B, B)
        lse = torch.logsumexp(logits, 1) + torch.logsumexp(logits, 0)  # (B,): row i of a, column i of b
        ce = 0.5 * lse.mean() - logits.diagonal().mean()
    return math.log(a.shape[0]) - ce


class _SharedExpNCE(torch.autograd.Function):
    """CE = mean_i (lse_row_i + lse_col_i) / 2 - mean_i logit_ii for logits = a @ b.T bounded by ``bound``.

    E = exp(logits - bound) once; lse_row = log(E.sum(1)) + bound, lse_col = log(E.sum(0)) + bound.
    d CE / d logits = (E / rowsum[:, None] + E / colsum[None, :]) / (2B) - I / B.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:  # type: ignore[override]
        logits = a @ b.T  # (B, B)
        diag = logits.diagonal().mean()
        e = logits.sub_(bound).exp_()  # in place: the logits are not needed again
        row, col = e.sum(1), e.sum(0)
        ce = 0.5 * (row.log() + col.log()).mean() + bound - diag
        ctx.save_for_backward(a, b, e, row, col)
        return ce

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        a, b, e, row, col = ctx.saved_tensors
        n = e.shape[0]
        half = grad * (0.5 / n)
        g = e * (half / row)[:, None]
        g.addcmul_(e, (half / col)[None, :])
        g.diagonal().sub_(grad / n)
        return g @ b, g.T @ a, None


def jsd_mi(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon lower bound on mutual information from critic scores (as the Multi-View Information
    Bottleneck estimates it): E_pos[-softplus(-T)] - E_neg[softplus(T)], for scores of paired (B,) and unpaired
    (B,) samples. It is at most 0, reached as the critic separates the pairs from the others perfectly; a critic
    that cannot tell them apart gives -2 log 2."""
    return -F.softplus(-pos).mean() - F.softplus(neg).mean()


def gaussian_kl(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """KL(N(mu1, sigma1^2) || N(mu2, sigma2^2)) for diagonal Gaussians, summed over d: (B, d) -> (B,)."""
    var1, var2 = sigma1.pow(2), sigma2.pow(2)
    return (torch.log(sigma2 / sigma1) + (var1 + (mu1 - mu2).pow(2)) / (2.0 * var2) - 0.5).sum(-1)


def average_kl(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """AKL = (KL(p1 || p2) + KL(p2 || p1)) / 2, averaged over the B rows."""
    return 0.5 * (gaussian_kl(mu1, sigma1, mu2, sigma2) + gaussian_kl(mu2, sigma2, mu1, sigma1)).mean()


def frobenius_reg(*matrices: torch.Tensor, denominator: int) -> torch.Tensor:
    """BM3's regularizer: the sum of the Frobenius norms of full embedding matrices, divided by ``denominator``."""
    return sum(torch.linalg.vector_norm(m) for m in matrices) / denominator


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalized ranking: -log sigmoid(pos - neg), averaged over the (B,) scores."""
    return -F.logsigmoid(pos - neg).mean()

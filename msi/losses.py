"""The loss terms of MSI, BM3 and LightGCN as plain functions on tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C(x, y) = 1 - cos(x, y), averaged over the rows of (B, d) inputs."""
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE estimate I_NCE(a; b) = log B - CE, for paired codes a, b of shape (B, d).

    Logits are cosine similarities / tau; row i of ``a`` and row i of ``b`` are the positive pair, the other rows
    the negatives; the cross-entropy is averaged over both directions. The estimate lies in (-inf, log B].
    """
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    ce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return math.log(a.shape[0]) - ce


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

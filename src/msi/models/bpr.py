"""BPR-MF (Rendle et al., UAI 2009): matrix factorisation trained with Bayesian personalized ranking.

    s(u, i) = <p_u, q_i>
    L = BPR(s(u, i+), s(u, i-)) + gamma * (||P_B||_F + ||Q_B+||_F + ||Q_B-||_F) / B

P_B, Q_B+, Q_B- are the batch's user, positive and negative rows (B, d); one uniform negative per positive, never
one of the user's train items. The regulariser is MMRec's (Frobenius norms of the batch rows over B), so that
loss.gamma means what MMRec's reg_weight means (docs/models.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from msi.losses import bpr_loss, frobenius_reg
from msi.models.base import Recommender, pair_keys
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


class BPR(Recommender):
    """Args: sizes, the train pairs (n, 2) (negatives reject them), d and the regulariser's weight."""

    param_groups = {"user": "embeddings", "item": "embeddings"}

    def __init__(
        self, n_users: int, n_items: int, train: np.ndarray | torch.Tensor, embedding_dim: int = 64,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.gamma = n_users, n_items, gamma
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        self.user = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, embedding_dim)))  # P (U, d)
        self.item = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_items, embedding_dim)))  # Q (I, d)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        return {"user": self.user.detach().clone(), "id": self.item.detach().clone()}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        u, i, j = self.user[users], self.item[items], self.item[neg]  # (B, d) each
        bpr = bpr_loss((u * i).sum(-1), (u * j).sum(-1))
        reg = frobenius_reg(u, i, j, denominator=len(users))
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class BPRModel:
    """The model.* keys of model.name=bpr."""

    embedding_dim: int = key(64, "d: size of the user and item embeddings (MMRec: embedding_size)", check=">0")


@dataclass
class BPRLoss:
    """The loss.* keys of model.name=bpr."""

    gamma: float = key(2.0, "weight of the batch rows' Frobenius norms over B (MMRec: reg_weight, its first grid "
                            "value)", check=">=0")


@register("bpr", item_features=False, model=BPRModel, loss=BPRLoss)
def build(cfg: Config, data: Dataset) -> BPR:
    """BPR-MF on ``data``'s users and items: ``model.embedding_dim`` and ``loss.gamma``."""
    return BPR(data.n_users, data.n_items, data.train, embedding_dim=cfg.model.embedding_dim, gamma=cfg.loss.gamma)

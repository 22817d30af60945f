"""LightGCN (He et al., SIGIR 2020): the ID graph only, trained with BPR and one sampled negative per positive.

    Z_{l+1} = Â Z_l,  Z = mean(Z_0..Z_L),  s(u, i) = <z_u, z_i>
    L = BPR(s(u, i+), s(u, i-)) + gamma * (||z_u^0||^2 + ||z_i+^0||^2 + ||z_i-^0||^2) / (2B)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from msi.data.dataset import Dataset
from msi.data.graph import normalized_adjacency
from msi.losses import bpr_loss
from msi.models.base import Recommender, lightgcn_readout, pair_keys
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config


class LightGCN(Recommender):
    """Args: sizes, the (N, N) normalized adjacency, the train pairs (n, 2) (negatives reject them)."""

    param_groups = {"emb": "embeddings"}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        adj: torch.Tensor,
        train: np.ndarray | torch.Tensor,
        embedding_dim: int = 64,
        n_layers: int = 1,
        gamma: float = 1e-4,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.gamma = n_users, n_items, n_layers, gamma
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        self.emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users + n_items, embedding_dim)))

    def _propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = lightgcn_readout(self.adj, self.emb, self.n_layers)
        return z[: self.n_users], z[self.n_users :]

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        user, item = self._propagate()
        return {"user": user, "id": item}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        user, item = self._propagate()
        u = user[users]
        bpr = bpr_loss((u * item[items]).sum(-1), (u * item[neg]).sum(-1))
        ego = self.emb
        reg = (
            ego[users].pow(2).sum() + ego[self.n_users + items].pow(2).sum() + ego[self.n_users + neg].pow(2).sum()
        ) / (2 * len(users))
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class LightGCNModel:
    """The model.* keys of model.name=lightgcn."""

    embedding_dim: int = key(64, "d: size of the user and item embeddings", check=">0")
    n_layers: int = key(1, "L: LightGCN layers", check=">=0")


@dataclass
class LightGCNLoss:
    """The loss.* keys of model.name=lightgcn."""

    gamma: float = key(1e-4, "L2 weight of the batch's layer-0 embeddings (MMRec: reg_weight)", check=">=0")


@register("lightgcn", item_features=False, model=LightGCNModel, loss=LightGCNLoss)
def build(cfg: Config, data: Dataset) -> LightGCN:
    """LightGCN on ``data``'s train graph: ``model.embedding_dim``, ``model.n_layers`` and ``loss.gamma``."""
    m = cfg.model
    return LightGCN(
        data.n_users, data.n_items, normalized_adjacency(data.train, data.n_users, data.n_items), data.train,
        embedding_dim=m.embedding_dim, n_layers=m.n_layers, gamma=cfg.loss.gamma,
    )

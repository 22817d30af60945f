"""VBPR (He and McAuley, AAAI 2016): BPR-MF plus a visual term, items' content features projected by a learned E.

    s(u, i) = <gamma_u, gamma_i> + <theta_u, E f_i + b>
    L = BPR(s(u, i+), s(u, i-)) + gamma * (||X_B||_F + ||Y_B+||_F + ||Y_B-||_F) / B

f_i (F,) is the concatenation of item i's features of every modality (TikTok: image and audio; the paper has one,
the CNN's image features), E (d', F) and b (d,) a linear map. As in MMRec, the paper's bias terms are left out
(beta_u and alpha cancel in BPR; beta_i and beta'^T f_i are not kept). X_B = [gamma_u ; theta_u] (B, d + d') are
the batch's user rows, Y = [gamma_i ; E f_i + b] (B, d + d') its positive and negative item rows; the regulariser
is MMRec's (docs/models.md).
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


class VBPR(Recommender):
    """Args: sizes, the train pairs (n, 2), item features modality -> (I, F_m) (concatenated in this order), d (the
    ID part), d' (the projected feature part) and the regulariser's weight."""

    param_groups = {"user": "embeddings", "item": "embeddings", "proj": "projection"}

    def __init__(
        self, n_users: int, n_items: int, train: np.ndarray | torch.Tensor, features: dict[str, torch.Tensor],
        embedding_dim: int = 64, feature_dim: int = 64, gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if not features:
            raise ValueError("VBPR needs item features of at least one modality")
        self.n_users, self.n_items, self.embedding_dim, self.gamma = n_users, n_items, embedding_dim, gamma
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        f = torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in features.values()], dim=1)  # (I, F)
        self.register_buffer("features", f, persistent=False)
        # [gamma_u ; theta_u] (U, d + d') and gamma_i (I, d)
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, embedding_dim + feature_dim)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, embedding_dim)))
        self.proj = nn.Linear(f.shape[1], feature_dim)  # E, b
        nn.init.xavier_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def item_rows(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """[gamma_i ; E f_i + b] of ``items`` (B,) (all items when None): (B, d + d')."""
        if items is None:
            return torch.cat([self.item, self.proj(self.features)], dim=1)
        return torch.cat([self.item[items], self.proj(self.features[items])], dim=1)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        return {"user": self.user.detach().clone(), "id": self.item_rows()}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        u, i, j = self.user[users], self.item_rows(items), self.item_rows(neg)  # (B, d + d') each
        bpr = bpr_loss((u * i).sum(-1), (u * j).sum(-1))
        reg = frobenius_reg(u, i, j, denominator=len(users))
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class VBPRModel:
    """The model.* keys of model.name=vbpr."""

    embedding_dim: int = key(64, "d: size of the ID part of the embeddings (MMRec: embedding_size)", check=">0")
    feature_dim: int = key(64, "d': size of the projected feature part E f_i + b (MMRec: embedding_size too)",
                           check=">0")


@dataclass
class VBPRLoss:
    """The loss.* keys of model.name=vbpr."""

    gamma: float = key(2.0, "weight of the batch rows' Frobenius norms over B (MMRec: reg_weight, its first grid "
                            "value)", check=">=0")


@register("vbpr", model=VBPRModel, loss=VBPRLoss)
def build(cfg: Config, data: Dataset) -> VBPR:
    """VBPR on ``data``'s train pairs and the features of every modality in ``data.modalities``:
    ``model.embedding_dim``, ``model.feature_dim`` and ``loss.gamma``."""
    feats = {m: torch.from_numpy(f) for m, f in data.features.items()}
    return VBPR(data.n_users, data.n_items, data.train, feats, embedding_dim=cfg.model.embedding_dim,
                feature_dim=cfg.model.feature_dim, gamma=cfg.loss.gamma)

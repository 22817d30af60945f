"""The popularity floor: every user gets the items ranked by their number of train interactions.

Registered as the model ``popularity`` (no keys, no item features): ``msi-train`` scores it once, as epoch 0, with
no epoch to train (msi.train), and msi-eval, msi-recommend and msi-compare open its run like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from msi.models.base import Recommender
from msi.registry import register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


class Popularity(Recommender):
    """s(u, i) = number of train rows of item i, for every user. Nothing to train."""

    def __init__(self, n_users: int, n_items: int, train: np.ndarray) -> None:
        super().__init__()
        counts = np.bincount(np.asarray(train)[:, 1], minlength=n_items).astype(np.float32)
        self.register_buffer("user_ones", torch.ones(n_users, 1))
        self.register_buffer("counts", torch.from_numpy(counts)[:, None])  # (I, 1)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        return {"user": self.user_ones, "id": self.counts}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        raise TypeError("the popularity baseline has nothing to train; evaluate it directly")


@register("popularity", item_features=False)
def build(cfg: Config, data: Dataset) -> Popularity:
    """Popularity on ``data``'s train pairs; it reads no key."""
    return Popularity(data.n_users, data.n_items, data.train)

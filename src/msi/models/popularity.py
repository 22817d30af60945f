"""The popularity floor: every user gets the items ranked by their number of train interactions."""

from __future__ import annotations

import numpy as np
import torch

from msi.models.base import Recommender


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

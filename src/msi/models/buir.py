"""BUIR (Lee et al., SIGIR 2021, arXiv 2105.06323) with the LightGCN encoder (BUIR_NB): no negatives; an online
encoder and a predictor learn to predict a slowly moving target encoder's representation of the other side.

    f_theta, f_xi: LightGCN readouts of the online embeddings E (a parameter) and the target's E_xi (a buffer)
    q(x) = W x + b                                            the predictor (online only)
    L(u, i) = (2 - 2 cos(q(f_theta(u)), f_xi(i))) + (2 - 2 cos(q(f_theta(i)), f_xi(u)))     mean over the batch
    xi <- tau * xi + (1 - tau) * theta                        after every optimizer step (momentum tau)
    s(u, i) = <q(f_theta(u)), f_theta(i)> + <f_theta(u), q(f_theta(i))>

The target receives no gradient (stop-gradient). The trainer calls ``loss`` once per step between two optimizer
steps, so the momentum update for step t's weights runs at the start of step t + 1's ``loss``: the same sequence of
targets as an update right after each step (the first call finds xi = theta and leaves it so). Only a training-mode
call with gradients enabled updates. ``embeddings()`` stacks [q(f(u)), f(u)] and [f(i), q(f(i))] so that their
inner product is s(u, i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from msi.data.dataset import Dataset
from msi.data.graph import normalized_adjacency
from msi.models.base import Recommender, lightgcn_readout
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config


def bootstrap_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(online, target) per row (B,): the squared distance of the L2-normalised rows."""
    return 2 - 2 * (F.normalize(online, dim=-1) * F.normalize(target, dim=-1)).sum(-1)


class BUIR(Recommender):
    """Args: sizes, the (N, N) normalized adjacency Â; embedding_dim, n_layers (LightGCN), momentum tau."""

    param_groups = {"emb": "embeddings", "predictor": "predictor"}

    def __init__(self, n_users: int, n_items: int, adj: torch.Tensor, embedding_dim: int = 64, n_layers: int = 3,
                 momentum: float = 0.995) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.momentum = n_users, n_items, n_layers, momentum
        self.register_buffer("adj", adj, persistent=False)
        self.emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users + n_items, embedding_dim)))
        self.register_buffer("target_emb", self.emb.detach().clone())  # persistent: training changes it
        self.predictor = nn.Linear(embedding_dim, embedding_dim)

    @torch.no_grad()
    def update_target(self) -> None:
        """xi <- tau * xi + (1 - tau) * theta."""
        self.target_emb.mul_(self.momentum).add_(self.emb.detach(), alpha=1 - self.momentum)

    def _online(self) -> torch.Tensor:
        return lightgcn_readout(self.adj, self.emb, self.n_layers)  # (N, d)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        z = self._online()
        p = self.predictor(z)
        u, i = slice(0, self.n_users), slice(self.n_users, None)
        return {"user": torch.cat([p[u], z[u]], 1), "id": torch.cat([z[i], p[i]], 1)}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and torch.is_grad_enabled():
            self.update_target()  # for the weights of the previous optimizer step
        z = self._online()
        with torch.no_grad():
            t = lightgcn_readout(self.adj, self.target_emb, self.n_layers)
        items = items + self.n_users
        ui = bootstrap_loss(self.predictor(z[users]), t[items]).mean()
        iu = bootstrap_loss(self.predictor(z[items]), t[users]).mean()
        return {"ui": ui, "iu": iu, "loss": ui + iu}


@dataclass
class BUIRModel:
    """The model.* keys of model.name=buir."""

    embedding_dim: int = key(64, "d: size of the user and item embeddings (the scores use 2d: [q(f), f])",
                             check=">0")
    n_layers: int = key(3, "L: LightGCN layers of the encoders", check=">=0")
    momentum: float = key(0.995, "tau: the target's momentum, xi <- tau xi + (1 - tau) theta per step",
                          check="[0,1]")


@register("buir", item_features=False, model=BUIRModel)
def build(cfg: Config, data: Dataset) -> BUIR:
    """BUIR_NB on ``data``'s train graph: ``model.embedding_dim``, ``model.n_layers``, ``model.momentum``."""
    m = cfg.model
    return BUIR(data.n_users, data.n_items, normalized_adjacency(data.train, data.n_users, data.n_items),
                embedding_dim=m.embedding_dim, n_layers=m.n_layers, momentum=m.momentum)

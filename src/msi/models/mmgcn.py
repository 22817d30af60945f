"""MMGCN (Wei et al., ACM MM 2019): one graph network per modality over the user-item graph, each with its own
user preferences, the modalities' outputs averaged.

For modality m, users start from a preference P_m (U, F') and items from their features, the first modality's
projected (f_m W_p + b_p, width F' = latent_dim), the others' as they are (F' = F_m); X^0 = the row-L2-normalised
[P_m; item rows] (N, F'). Layer l (0-based) with mean aggregation
Â = D^-1 A (each node averages its neighbours), the shared ID embedding E (N, d) and lr = leaky_relu:

    H = lr(Â X^l C_l),  X̂ = lr(X^l L_l + b_l) + E,  X^{l+1} = lr([H, X̂] G_l + g_l)
    R = mean_m X_m^{n_layers},  s(u, i) = <r_u, r_i>
    L = BPR(s(u, i+), s(u, i-)) + gamma * ((2|e_u|^2 + |e_i+|^2 + |e_i-|^2) / (2 B d) + sum_m mean(P_m^2))

``frozen_embeddings=True`` keeps E and every P_m at their random start, as MMRec's MMGCN does by keeping them as
plain tensors outside the optimiser; the paper learns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from msi.data.graph import mean_adjacency
from msi.losses import bpr_loss
from msi.models.base import Recommender, pair_keys, sparse_product
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


def _xavier_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_normal_(layer.weight)
    return layer


class ModalityGCN(nn.Module):
    """One modality's tower: features (I, F) -> node representations (N, d) through ``n_layers`` layers; the
    features are first projected to ``latent_dim`` unless it is 0.

    Initialised as MMRec initialises it: Xavier-normal preference, conv and ``linear`` weights and the first
    combination weight; torch's default for the projection and the later combination layers."""

    def __init__(self, features: torch.Tensor, n_users: int, latent_dim: int, embedding_dim: int, n_layers: int,
                 frozen: bool) -> None:
        super().__init__()
        self.register_buffer("features", features, persistent=False)
        self.project = nn.Linear(features.shape[1], latent_dim) if latent_dim else None
        latent_dim = latent_dim or features.shape[1]
        preference = nn.init.xavier_normal_(torch.empty(n_users, latent_dim))
        if frozen:
            self.register_buffer("preference", preference)
        else:
            self.preference = nn.Parameter(preference)
        widths = [latent_dim] + [embedding_dim] * (n_layers - 1)
        self.conv = nn.ParameterList([nn.Parameter(nn.init.xavier_normal_(torch.empty(w, w))) for w in widths])
        self.linear = nn.ModuleList([_xavier_linear(w, embedding_dim) for w in widths])
        self.combine = nn.ModuleList(
            [_xavier_linear(latent_dim + embedding_dim, embedding_dim)]
            + [nn.Linear(2 * embedding_dim, embedding_dim) for _ in widths[1:]]
        )

    def forward(self, id_emb: torch.Tensor, adj: torch.Tensor, adj_t: torch.Tensor) -> torch.Tensor:
        """(N, d) with the shared ID embedding ``id_emb`` (N, d) and the mean-aggregation graph (adj, its T)."""
        items = self.features if self.project is None else self.project(self.features)
        x = F.normalize(torch.cat([self.preference, items]))  # (N, F')
        for conv, linear, combine in zip(self.conv, self.linear, self.combine):
            h = F.leaky_relu(sparse_product(adj, adj_t, x @ conv))  # (N, w)
            x_hat = F.leaky_relu(linear(x)) + id_emb  # (N, d)
            x = F.leaky_relu(combine(torch.cat([h, x_hat], dim=1)))  # (N, d)
        return x


class MMGCN(Recommender):
    """Args: sizes, the mean-aggregation graph (D^-1 A, its transpose) over users then items, the modalities'
    features {name: (I, F_m)}, the train pairs (n, 2) (negatives reject them), and the hyper-parameters."""

    param_groups = {"towers": "towers", "id_emb": "embeddings"}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        adj: tuple[torch.Tensor, torch.Tensor],
        features: dict[str, torch.Tensor],
        train,
        embedding_dim: int = 64,
        latent_dim: int = 256,
        n_layers: int = 3,
        frozen_embeddings: bool = False,
        gamma: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.gamma = n_users, n_items, gamma
        self.register_buffer("adj", adj[0], persistent=False)
        self.register_buffer("adj_t", adj[1], persistent=False)
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        self.towers = nn.ModuleDict({
            m: ModalityGCN(f.float(), n_users, 0 if k else latent_dim, embedding_dim, n_layers, frozen_embeddings)
            for k, (m, f) in enumerate(features.items())
        })
        id_emb = nn.init.xavier_normal_(torch.empty(n_users + n_items, embedding_dim))
        if frozen_embeddings:
            self.register_buffer("id_emb", id_emb)
        else:
            self.id_emb = nn.Parameter(id_emb)

    def _represent(self) -> torch.Tensor:
        """R (N, d): the mean of the modality towers' outputs."""
        out = [tower(self.id_emb, self.adj, self.adj_t) for tower in self.towers.values()]
        return torch.stack(out).mean(0)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        r = self._represent()
        return {"user": r[: self.n_users], "id": r[self.n_users :]}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        r = self._represent()
        u, pos, ng = r[users], r[self.n_users + items], r[self.n_users + neg]
        bpr = bpr_loss((u * pos).sum(-1), (u * ng).sum(-1))
        e = self.id_emb
        ids = (2 * e[users].pow(2).sum() + e[self.n_users + items].pow(2).sum() + e[self.n_users + neg].pow(2).sum())
        reg = ids / (2 * len(users) * e.shape[1]) + sum(t.preference.pow(2).mean() for t in self.towers.values())
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class MMGCNModel:
    """The model.* keys of model.name=mmgcn."""

    embedding_dim: int = key(64, "d: size of the ID embeddings and of each layer's output (MMRec: embedding_size)",
                             check=">0")
    latent_dim: int = key(256, "F': width the first modality's features are projected to before the first layer "
                          "(MMRec: dim_latent of its v slot); the other modalities enter at their own width",
                          check=">0")
    n_layers: int = key(3, "graph layers per modality (MMRec runs 3 whatever its n_layers says)", check=">0")
    frozen_embeddings: bool = key(False, "keep the ID embeddings and user preferences at their random start, as "
                                  "MMRec's MMGCN does (they are outside its optimiser); false: learned (the paper)")


@dataclass
class MMGCNLoss:
    """The loss.* keys of model.name=mmgcn."""

    gamma: float = key(0.0, "L2 weight of the batch's ID embeddings and the user preferences (MMRec: reg_weight)",
                       check=">=0")


@register("mmgcn", model=MMGCNModel, loss=MMGCNLoss)
def build(cfg: Config, data: Dataset) -> MMGCN:
    """MMGCN on ``data``'s train graph and every modality's features: ``model.embedding_dim``,
    ``model.latent_dim``, ``model.n_layers``, ``model.frozen_embeddings`` and ``loss.gamma``."""
    m = cfg.model
    return MMGCN(
        data.n_users, data.n_items, mean_adjacency(data.train, data.n_users, data.n_items),
        {name: torch.from_numpy(f) for name, f in data.features.items()}, data.train,
        embedding_dim=m.embedding_dim, latent_dim=m.latent_dim, n_layers=m.n_layers,
        frozen_embeddings=m.frozen_embeddings, gamma=cfg.loss.gamma,
    )

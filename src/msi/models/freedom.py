"""FREEDOM (Zhou & Shen, ACM MM 2023): a frozen kNN item-item graph from the raw features, and a user-item graph
denoised each epoch by degree-sensitive edge pruning.

    S^m = D^-1/2 kNN_k(raw_m) D^-1/2 (binary, each item's k most cosine-similar items, itself included)
    S = w_1 S^1 + sum_{m>1} (1 - w_1) / (M - 1) S^m      built once from the features, never trained
    h = S^L' e_id                                          (I, d), L' = n_item_layers
    Â_ρ = D^-1/2 A_ρ D^-1/2,  A_ρ: (1 - ρ)|E| train edges drawn without replacement, edge (u, i) with probability
          proportional to 1 / sqrt(d_u d_i); redrawn each epoch; the full Â scores (eval)
    (z_u, z_i) = mean(Z_0..Z_L) over Â_ρ (train) or Â (eval),  item representation z_i + h_i
    L = BPR(s(u, i+), s(u, i-)) + lambda * sum_m BPR(<z_u, W_m x_i+^m>, <z_u, W_m x_j-^m>)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from msi.data.graph import normalized_adjacency
from msi.losses import bpr_loss
from msi.models.base import Recommender, lightgcn_readout, pair_keys, sparse_product
from msi.models.knn import cosine_knn, knn_edges, sym_normalize, to_csr
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


def frozen_item_graph(
    features: dict[str, torch.Tensor], k: int, first_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FREEDOM's S (I, I) as an edge list (rows, cols, values; duplicates add up): the weighted sum of each
    modality's binary kNN graph, each normalized D^-1/2 S^m D^-1/2 by its row sums (k), so every entry of S^m is
    1 / k. The first modality weighs ``first_weight``, the others share the rest equally; a single one weighs 1."""
    mats = list(features.values())
    weights = [1.0] if len(mats) == 1 else [first_weight] + [(1 - first_weight) / (len(mats) - 1)] * (len(mats) - 1)
    n = mats[0].shape[0]
    edges = [knn_edges(cosine_knn(x.float(), k)[0]) for x in mats]
    vals = [w * sym_normalize(r, c, torch.ones(len(r)), n) for w, (r, c) in zip(weights, edges)]
    return torch.cat([r for r, _ in edges]), torch.cat([c for _, c in edges]), torch.cat(vals)


def pruning_weights(pairs: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """1 / sqrt(d_u d_i) of each unique train edge (E, 2) -> (E,): FREEDOM's degree-sensitive keep probabilities
    (up to their sum), the user-item entries of the normalized Â."""
    d_u = torch.bincount(pairs[:, 0], minlength=n_users).float()
    d_i = torch.bincount(pairs[:, 1], minlength=n_items).float()
    return (d_u[pairs[:, 0]] * d_i[pairs[:, 1]]).rsqrt()


class FREEDOM(Recommender):
    """Args: sizes, the train pairs (n, 2), the raw item features {modality: (I, F_m)}, and the hyper-parameters
    of the module docstring (``dropout`` = ρ, the share of train edges pruned each epoch; ``modality_weight`` =
    lambda). The raw features are trainable, as in MMRec; they and the projections W_m learn only through the
    lambda term (at lambda = 0, MMRec's default, they never change, and the term is not computed)."""

    param_groups = {"user": "embeddings", "item": "embeddings", "raw": "features", "proj": "projections"}

    def __init__(
        self, n_users: int, n_items: int, train: np.ndarray, features: dict[str, torch.Tensor],
        embedding_dim: int = 64, n_layers: int = 2, n_item_layers: int = 1, knn_k: int = 10,
        first_graph_weight: float = 0.1, dropout: float = 0.8, modality_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.n_item_layers = n_users, n_items, n_layers, n_item_layers
        self.dropout, self.modality_weight = dropout, modality_weight
        pairs = torch.from_numpy(np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0))
        self.register_buffer("train_keys", pair_keys(pairs, n_items), persistent=False)
        self.register_buffer("edges", pairs, persistent=False)  # (E, 2) unique train edges
        self.register_buffer("edge_weights", pruning_weights(pairs, n_users, n_items), persistent=False)
        self.register_buffer("adj", normalized_adjacency(train, n_users, n_items), persistent=False)
        self.register_buffer("pruned_adj", None, persistent=False)  # Â_ρ of the current epoch, drawn in loss
        rows, cols, vals = frozen_item_graph(features, knn_k, first_graph_weight)
        self.register_buffer("item_graph", to_csr(rows, cols, vals, n_items), persistent=False)
        self.register_buffer("item_graph_t", to_csr(cols, rows, vals, n_items), persistent=False)  # for backward
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, embedding_dim)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, embedding_dim)))
        self.raw = nn.ParameterDict({m: nn.Parameter(x.float().clone()) for m, x in features.items()})
        # W_m without a bias: a bias would cancel in the difference of the two BPR scores (MMRec's has one)
        self.proj = nn.ModuleDict({m: nn.Linear(x.shape[1], embedding_dim, bias=False) for m, x in features.items()})

    def start_epoch(self, epoch: int) -> None:
        """A new epoch prunes the user-item graph anew (at its first batch)."""
        self.pruned_adj = None

    def prune(self) -> torch.Tensor:
        """Â_ρ: keep round((1 - ρ) E) edges drawn without replacement with probability ~ 1 / sqrt(d_u d_i), and
        normalize them by their own degrees. ρ = 0 keeps the full Â."""
        n_keep = int(len(self.edges) * (1.0 - self.dropout))
        if n_keep >= len(self.edges):
            return self.adj
        keep = torch.multinomial(self.edge_weights, n_keep, replacement=False)
        kept = self.edges[keep].cpu().numpy()  # a few thousand rows once an epoch
        return normalized_adjacency(kept, self.n_users, self.n_items).to(self.adj.device)

    def _propagate(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, d), items (I, d)): the LightGCN readout over ``adj`` plus h = S^L' e_id for the items."""
        z = lightgcn_readout(adj, torch.cat([self.user, self.item]), self.n_layers)
        h = self.item
        for _ in range(self.n_item_layers):
            h = sparse_product(self.item_graph, self.item_graph_t, h)
        return z[: self.n_users], z[self.n_users :] + h

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        user, item = self._propagate(self.adj)
        return {"user": user, "id": item}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        if self.pruned_adj is None:
            self.pruned_adj = self.prune()
        user, item = self._propagate(self.pruned_adj)
        u = user[users]
        bpr = bpr_loss((u * item[items]).sum(-1), (u * item[neg]).sum(-1))
        if self.modality_weight == 0:  # the term would change nothing: neither computed nor logged
            return {"bpr": bpr, "loss": bpr}
        feat = sum(  # <z_u, W x_i+> - <z_u, W x_j-> = <z_u, W (x_i+ - x_j-)>: one product
            bpr_loss((u * self.proj[m](x[items] - x[neg])).sum(-1), 0.0) for m, x in self.raw.items()
        )
        return {"bpr": bpr, "feature_bpr": feat, "loss": bpr + self.modality_weight * feat}


@dataclass
class FREEDOMModel:
    """The model.* keys of model.name=freedom (defaults: MMRec's FREEDOM.yaml, the first value of each grid axis)."""

    embedding_dim: int = key(64, "d: size of the user and item embeddings and of the projected features", check=">0")
    n_layers: int = key(2, "L: LightGCN layers over the user-item graph (MMRec: n_ui_layers)", check=">=0")
    n_item_layers: int = key(1, "L': layers over the frozen item-item graph (MMRec: n_mm_layers)", check=">=0")
    knn_k: int = key(10, "k: neighbours of each item in each modality's kNN graph", check=">0")
    first_graph_weight: float = key(
        0.1, "weight of the first modality's kNN graph (TikTok, Amazon: image), the others share the rest "
        "(MMRec: mm_image_weight)", check="[0,1]")
    dropout: float = key(0.8, "rho: share of train edges pruned each epoch, degree-sensitively", check="[0,1)")


@dataclass
class FREEDOMLoss:
    """The loss.* keys of model.name=freedom."""

    modality_weight: float = key(
        0.0, "lambda: weight of each modality's BPR term on the projected raw features (MMRec: reg_weight)",
        check=">=0")


@register("freedom", model=FREEDOMModel, loss=FREEDOMLoss)
def build(cfg: Config, data: Dataset) -> FREEDOM:
    """FREEDOM on ``data``'s train graph and item features: ``model.embedding_dim``, ``model.n_layers``,
    ``model.n_item_layers``, ``model.knn_k``, ``model.first_graph_weight``, ``model.dropout`` and
    ``loss.modality_weight``."""
    m = cfg.model
    return FREEDOM(
        data.n_users, data.n_items, data.train, {name: torch.from_numpy(f) for name, f in data.features.items()},
        embedding_dim=m.embedding_dim, n_layers=m.n_layers, n_item_layers=m.n_item_layers, knn_k=m.knn_k,
        first_graph_weight=m.first_graph_weight, dropout=m.dropout, modality_weight=cfg.loss.modality_weight,
    )

"""LATTICE (Zhang et al., ACM MM 2021): an item-item graph learned from projected features, mixed with the kNN
graph of the raw features, over a LightGCN user-item graph.

    S~^m = D^-1/2 kNN_k(cos(raw_m)) D^-1/2          (weighted by the cosines; built once from the raw features)
    Ŝ^m = kNN_k(cos(W_m raw_m + b_m))               (learned: rebuilt from the current projections)
    A = (1 - lambda) D^-1/2 (sum_m a_m Ŝ^m) D^-1/2 + lambda sum_m a_m S~^m,   a = softmax(modal weights)
    h = A^L' e_id,  (z_u, z_i) = mean(Z_0..Z_L) over P = D^-1 (R + I),  item representation z_i + h_i / |h_i|
    L = BPR(s(u, i+), s(u, i-)) + gamma * (|z_u|^2 + |z_i+|^2 + |z_j-|^2) / (2B)

As in MMRec, A is rebuilt at the first batch of each epoch, with the gradient reaching W_m, the raw features and
the modal weights through it, and held (detached) for the epoch's other batches; ``embeddings()`` rebuilds it from
the current parameters. The kNN similarities are computed in row chunks and A is a sparse edge list (at most
2 M k entries a row), never a dense I x I matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msi.data.graph import normalized_adjacency
from msi.losses import bpr_loss
from msi.models.base import Recommender, lightgcn_readout, pair_keys, sparse_product
from msi.models.knn import cosine_knn, knn_edges, sym_normalize, to_csr
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


def edge_mm(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S @ x for the edge list S (duplicates add up) and x (I, d), differentiable in both ``values`` and ``x``."""
    return torch.zeros_like(x).index_add(0, rows, values[:, None] * x[cols])


class LATTICE(Recommender):
    """Args: sizes, the train pairs (n, 2), the raw item features {modality: (I, F_m)}, and the hyper-parameters
    of the module docstring (``init_graph_weight`` = lambda, ``feature_dim`` = the rows of W_m)."""

    param_groups = {"user": "embeddings", "item": "embeddings", "raw": "features", "proj": "projections",
                    "modal_weight": "projections"}

    def __init__(
        self, n_users: int, n_items: int, train: np.ndarray, features: dict[str, torch.Tensor],
        embedding_dim: int = 64, feature_dim: int = 64, n_layers: int = 2, n_item_layers: int = 1,
        knn_k: int = 10, init_graph_weight: float = 0.9, gamma: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.n_item_layers = n_users, n_items, n_layers, n_item_layers
        self.k, self.lam, self.gamma = knn_k, init_graph_weight, gamma
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        # P = D^-1 (R + I) = D^-1/2 S D^1/2 with S = D^-1/2 (R + I) D^-1/2 symmetric: propagate over S, rescale
        self.register_buffer("adj", normalized_adjacency(train, n_users, n_items, self_loops=True), persistent=False)
        pairs = np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0)
        deg = 1.0 + np.bincount(np.concatenate([pairs[:, 0], pairs[:, 1] + n_users]), minlength=n_users + n_items)
        self.register_buffer("deg_sqrt", torch.from_numpy(np.sqrt(deg)).float()[:, None], persistent=False)
        init = [self._knn_graph(x.float()) for x in features.values()]  # S~^m, each (rows, cols, values)
        self.register_buffer("init_rows", torch.cat([r for r, _, _ in init]), persistent=False)
        self.register_buffer("init_cols", torch.cat([c for _, c, _ in init]), persistent=False)
        self.register_buffer("init_values", torch.stack([v for _, _, v in init]), persistent=False)  # (M, I k)
        self.register_buffer("epoch_graph", None, persistent=False)  # this epoch's A (CSR), set in loss
        self.register_buffer("epoch_graph_t", None, persistent=False)  # and its transpose
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, embedding_dim)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, embedding_dim)))
        self.modalities = list(features)  # the order of the modal weights (a ParameterDict sorts its keys)
        self.raw = nn.ParameterDict({m: nn.Parameter(x.float().clone()) for m, x in features.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(x.shape[1], feature_dim) for m, x in features.items()})
        self.modal_weight = nn.Parameter(torch.full((len(features),), 1.0 / len(features)))

    def _knn_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, sim = cosine_knn(x, self.k)
        rows, cols = knn_edges(idx)
        return rows, cols, sym_normalize(rows, cols, sim.flatten(), self.n_items)

    def learned_graph(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A as an edge list (rows, cols, values), differentiable in the projections, raw features and modal
        weights."""
        a = torch.softmax(self.modal_weight, 0)
        edges, vals = [], []
        for w, m in zip(a, self.modalities):
            idx, sim = cosine_knn(self.proj[m](self.raw[m]), self.k)
            edges.append(knn_edges(idx))
            vals.append(w * sim.flatten())
        rows_l, cols_l = torch.cat([r for r, _ in edges]), torch.cat([c for _, c in edges])
        learned = sym_normalize(rows_l, cols_l, torch.cat(vals), self.n_items)
        init = (a[:, None] * self.init_values).flatten()
        return (torch.cat([rows_l, self.init_rows]), torch.cat([cols_l, self.init_cols]),
                torch.cat([(1 - self.lam) * learned, self.lam * init]))

    def start_epoch(self, epoch: int) -> None:
        """A new epoch rebuilds A (at its first batch)."""
        self.epoch_graph = self.epoch_graph_t = None

    def _item_part(self, training: bool) -> torch.Tensor:
        """h / |h| (I, d) with h = A^L' e_id. ``training``: the epoch's A, built with its gradient at the epoch's
        first batch and held (detached) for the others; otherwise an A rebuilt from the current parameters."""
        h = self.item
        if training and self.epoch_graph is not None:
            for _ in range(self.n_item_layers):
                h = sparse_product(self.epoch_graph, self.epoch_graph_t, h)
            return F.normalize(h, dim=1)
        rows, cols, vals = self.learned_graph()
        if training:
            self.epoch_graph = to_csr(rows, cols, vals, self.n_items)
            self.epoch_graph_t = to_csr(cols, rows, vals, self.n_items)
        for _ in range(self.n_item_layers):
            h = edge_mm(rows, cols, vals, h)
        return F.normalize(h, dim=1)

    def _propagate(self, item_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = lightgcn_readout(self.adj, torch.cat([self.user, self.item]) * self.deg_sqrt, self.n_layers)
        z = z / self.deg_sqrt
        return z[: self.n_users], z[self.n_users :] + item_part

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        """From an A rebuilt from the current parameters (deterministic; the epoch's A is left as it is)."""
        user, item = self._propagate(self._item_part(training=False))
        return {"user": user, "id": item}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        user, item = self._propagate(self._item_part(training=True))
        u, i, j = user[users], item[items], item[neg]
        bpr = bpr_loss((u * i).sum(-1), (u * j).sum(-1))
        reg = (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / (2 * len(users))
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class LATTICEModel:
    """The model.* keys of model.name=lattice (defaults: MMRec's LATTICE.yaml, the first value of each grid axis)."""

    embedding_dim: int = key(64, "d: size of the user and item embeddings", check=">0")
    feature_dim: int = key(64, "rows of each modality's projection W_m (MMRec: feat_embed_dim)", check=">0")
    n_layers: int = key(2, "L: LightGCN layers over D^-1 (R + I) (MMRec: len(weight_size))", check=">=0")
    n_item_layers: int = key(1, "L': layers over the item-item graph (MMRec: n_layers)", check=">=0")
    knn_k: int = key(10, "k: neighbours of each item in each modality's kNN graph", check=">0")
    init_graph_weight: float = key(
        0.9, "lambda: weight of the raw features' kNN graph against the learned one (MMRec: lambda_coeff)",
        check="[0,1]")


@dataclass
class LATTICELoss:
    """The loss.* keys of model.name=lattice."""

    gamma: float = key(0.0, "L2 weight of the batch's final representations (MMRec: reg_weight)", check=">=0")


@register("lattice", model=LATTICEModel, loss=LATTICELoss)
def build(cfg: Config, data: Dataset) -> LATTICE:
    """LATTICE on ``data``'s train graph and item features: ``model.embedding_dim``, ``model.feature_dim``,
    ``model.n_layers``, ``model.n_item_layers``, ``model.knn_k``, ``model.init_graph_weight`` and ``loss.gamma``."""
    m = cfg.model
    return LATTICE(
        data.n_users, data.n_items, data.train, {name: torch.from_numpy(f) for name, f in data.features.items()},
        embedding_dim=m.embedding_dim, feature_dim=m.feature_dim, n_layers=m.n_layers,
        n_item_layers=m.n_item_layers, knn_k=m.knn_k, init_graph_weight=m.init_graph_weight, gamma=cfg.loss.gamma,
    )

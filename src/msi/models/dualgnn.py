"""DualGNN (Wang et al., IEEE Transactions on Multimedia 2021): per-modality GCNs on the user-item graph, a learned
fusion weight per user and modality, and the user co-occurrence graph. docs/models.md says what follows MMRec.

    x_m = rownorm([P_m; MLP_m(F_m)])           (N, d): user preferences P_m (U, d), projected item features
    r_m = x_m + Â x_m + ... + Â^L x_m           the sum of layers 0..L over the train graph
    item_i = sum_m r_m[i],  u_u = sum_m a_um r_m[u]     a (U, M): each user's modality weights, learned
    h_u = u_u + sum_{j in N_k(u)} w_uj u_j     N_k(u): u's top-k co-interacting users, w_u. = softmax of the counts
    s(u, i) = <h_u, item_i>
    L = BPR(s(u, i+), s(u, i-)) + gamma * (sum_m mean(P_m[u]^2) + mean(a^2))

In training a user with 1 <= n < k neighbours has them padded to k slots each epoch (MMRec's resampling): the
slots' multiplicities m_j >= 1, sum k, are drawn uniformly among such compositions and w_uj = softmax(c + log m)_j;
eval uses m = 1 (each neighbour once), so eval-mode scores are deterministic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from msi.data.dataset import Dataset
from msi.data.graph import normalized_adjacency
from msi.losses import bpr_loss
from msi.models.base import Recommender, lightgcn_readout, pair_keys, sparse_product
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config


def cooccurrence_neighbours(train: np.ndarray, n_users: int, n_items: int, k: int) -> tuple[np.ndarray, ...]:
    """Each user's top-k co-interacting users as CSR arrays (indptr (U+1,), neighbours, counts), from (n, 2) train
    (user, item) rows: count(u, j) = number of items both u and j interacted with (a pair counts once), u itself
    left out, users with no common item absent. Row u lists its neighbours by count descending, ties by lower id."""
    pairs = np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0)
    r = sp.csr_matrix((np.ones(len(pairs), np.int64), (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
    c = (r @ r.T).tocoo()
    off = c.row != c.col
    row, col, cnt = c.row[off].astype(np.int64), c.col[off].astype(np.int64), c.data[off].astype(np.int64)
    order = np.lexsort((col, -cnt, row))
    row, col, cnt = row[order], col[order], cnt[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)  # position within the user's row
    top = rank < k
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row[top], minlength=n_users))])
    return indptr, col[top], cnt[top]


def padding_multiplicities(degrees: torch.Tensor, k: int) -> torch.Tensor:
    """The multiplicity of each neighbour (one per CSR entry, row order) once every user with 1 <= n < k neighbours
    is padded to k slots: m_1..m_n >= 1 with sum k, uniform over such compositions (n - 1 cuts among the k - 1 gaps
    of k slots). It is the law of MMRec's padding, which appends k - n draws from the growing list (a Polya urn
    starting from one ball per neighbour). Users with no neighbours or at least k keep multiplicity 1."""
    short = (degrees > 0) & (degrees < k)
    n = degrees[short]
    rank = torch.rand(len(n), k - 1).argsort(1).argsort(1)  # a uniform random order of the gaps
    cut = (rank < (n - 1)[:, None]).long()  # n - 1 gaps chosen uniformly
    segment = torch.cat([torch.zeros(len(n), 1, dtype=torch.long), cut.cumsum(1)], 1)  # (S, k): slot -> part
    mult = torch.zeros(len(n), k).scatter_add_(1, segment, torch.ones(len(n), k))
    out = torch.ones(int(degrees.sum()))
    entry_short = torch.repeat_interleave(short, degrees)
    out[entry_short] = mult[torch.arange(k) < n[:, None]]
    return out


def row_softmax(rows: torch.Tensor, logits: torch.Tensor, n_rows: int) -> torch.Tensor:
    """softmax of ``logits`` within each row (``rows``: the row of each entry)."""
    top = torch.zeros(n_rows).scatter_reduce_(0, rows, logits, "amax", include_self=False)
    e = torch.exp(logits - top[rows])
    return e / torch.zeros(n_rows).index_add_(0, rows, e)[rows]


class DualGNN(Recommender):
    """Args: sizes, the (N, N) normalized adjacency Â, features {modality: (I, F_m)}, the (n, 2) train pairs
    (negatives reject them; the co-occurrence graph is built from them)."""

    param_groups = {"preference": "preferences", "mlp": "projections", "modality_weight": "fusion"}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        adj: torch.Tensor,
        features: dict[str, torch.Tensor],
        train: np.ndarray,
        embedding_dim: int = 64,
        n_layers: int = 2,
        n_neighbours: int = 40,
        neighbour_resampling: bool = True,
        gamma: float = 0.0693,
    ) -> None:
        super().__init__()
        if not features:
            raise ValueError("DualGNN needs at least one modality")
        self.n_users, self.n_items, self.n_layers, self.gamma = n_users, n_items, n_layers, gamma
        self.n_neighbours, self.neighbour_resampling = n_neighbours, neighbour_resampling
        self.modalities = tuple(features)
        d = embedding_dim
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        self.preference = nn.ParameterDict()
        self.mlp = nn.ModuleDict()
        for i, (m, feat) in enumerate(features.items()):
            if feat.shape[0] != n_items:
                raise ValueError(f"features[{m!r}] has {feat.shape[0]} rows, expected n_items = {n_items}")
            self.register_buffer(f"feat_{i}", feat.float(), persistent=False)
            self.preference[m] = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, d)))
            self.mlp[m] = nn.Sequential(nn.Linear(feat.shape[1], 4 * d), nn.LeakyReLU(), nn.Linear(4 * d, d))
        weight = nn.init.xavier_normal_(torch.empty(n_users, len(features)))
        self.modality_weight = nn.Parameter(torch.softmax(weight, dim=1))  # about 1/M each at the start
        indptr, cols, counts = cooccurrence_neighbours(train, n_users, n_items, n_neighbours)
        degrees = torch.from_numpy(np.diff(indptr))
        self.register_buffer("nb_degrees", degrees, persistent=False)
        self.register_buffer("nb_rows", torch.repeat_interleave(torch.arange(n_users), degrees), persistent=False)
        self.register_buffer("nb_cols", torch.from_numpy(cols), persistent=False)
        self.register_buffer("nb_counts", torch.from_numpy(counts).float(), persistent=False)
        self._set_user_graph("eval", torch.ones(len(cols)))
        self._set_user_graph("train", torch.ones(len(cols)))

    def _set_user_graph(self, which: str, multiplicities: torch.Tensor) -> None:
        """W (U, U) and W^T as CSR buffers ``user_graph_<which>`` / ``..._t``: w_uj = softmax_j(c_uj + log m_uj)."""
        w = row_softmax(self.nb_rows.cpu(), self.nb_counts.cpu() + multiplicities.log(), self.n_users)
        rows, cols, n = self.nb_rows.cpu(), self.nb_cols.cpu(), self.n_users
        for name, index in ((which, (rows, cols)), (f"{which}_t", (cols, rows))):
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_coo_tensor(torch.stack(index), w, (n, n)).coalesce().to_sparse_csr()
            self.register_buffer(f"user_graph_{name}", csr.to(self.adj.device), persistent=False)

    def start_epoch(self, epoch: int) -> None:
        """A fresh padding of the short neighbour lists for this epoch's training (``neighbour_resampling``)."""
        if self.neighbour_resampling:
            self._set_user_graph("train", padding_multiplicities(self.nb_degrees.cpu(), self.n_neighbours))

    def _representations(self, graph: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (U, d), item (I, d)) over the user graph ``graph`` ("train" or "eval")."""
        xs = []
        for i, m in enumerate(self.modalities):
            x = torch.cat([self.preference[m], self.mlp[m](getattr(self, f"feat_{i}"))])
            xs.append(nn.functional.normalize(x, dim=1))
        d = xs[0].shape[1]
        r = lightgcn_readout(self.adj, torch.cat(xs, 1), self.n_layers) * (self.n_layers + 1)  # layer sum
        r = r.view(-1, len(xs), d)  # (N, M, d)
        user = (self.modality_weight.unsqueeze(-1) * r[: self.n_users]).sum(1)
        w, w_t = getattr(self, f"user_graph_{graph}"), getattr(self, f"user_graph_{graph}_t")
        return user + sparse_product(w, w_t, user), r[self.n_users :].sum(1)

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        user, item = self._representations("train" if self.training else "eval")
        return {"user": user, "id": item}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = self.sample_negatives(users)
        user, item = self._representations("train")
        u = user[users]
        bpr = bpr_loss((u * item[items]).sum(-1), (u * item[neg]).sum(-1))
        reg = sum(p[users].pow(2).mean() for p in self.preference.values()) + self.modality_weight.pow(2).mean()
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class DualGNNModel:
    """The model.* keys of model.name=dualgnn."""

    embedding_dim: int = key(64, "d: size of the user preferences and projected item features", check=">0")
    n_layers: int = key(2, "L: GCN layers on the user-item graph (MMRec: two, fixed)", check=">=0")
    n_neighbours: int = key(40, "k: co-interacting users aggregated per user (MMRec: k, fixed at 40)", check=">0")
    neighbour_resampling: bool = key(True, "pad users with fewer than k neighbours to k by a fresh random draw "
                                           "each training epoch, as MMRec does (eval: each neighbour once)")


@dataclass
class DualGNNLoss:
    """The loss.* keys of model.name=dualgnn."""

    gamma: float = key(0.0693, "L2 weight of the batch users' preferences and the modality weights "
                            "(MMRec: reg_weight r against its log2 BPR is our r * ln 2; default: its 0.1)", check=">=0")


@register("dualgnn", model=DualGNNModel, loss=DualGNNLoss)
def build(cfg: Config, data: Dataset) -> DualGNN:
    """DualGNN on ``data``'s train graph and item features: ``model.embedding_dim``, ``model.n_layers``,
    ``model.n_neighbours``, ``model.neighbour_resampling`` and ``loss.gamma``."""
    m = cfg.model
    return DualGNN(
        data.n_users, data.n_items, normalized_adjacency(data.train, data.n_users, data.n_items),
        {name: torch.from_numpy(f) for name, f in data.features.items()}, data.train,
        embedding_dim=m.embedding_dim, n_layers=m.n_layers, n_neighbours=m.n_neighbours,
        neighbour_resampling=m.neighbour_resampling, gamma=cfg.loss.gamma,
    )

"""GRCN (Wei et al., ACM MM 2020): the user-item graph refined per modality, then a graph convolution of the ID
embeddings over the refined (weighted, pruned) graph.

Per modality m, item content f_i = normalize(lr(x_i W_m + b_m)) (I, C) and user prototypes p_u = normalize(P_m[u])
(U, C). Neighbour routing, n_routing times: p_u <- normalize(p_u + sum_{i in N(u)} softmax_{i in N(u)}(p_u.f_i) f_i).
Then, with s_ui = p_u.f_i, the edge affinities a_{u->i} = softmax over the users of i, a_{i->u} = softmax over the
items of u, and the modality's representation c_m = [p + sum_{i} a_{i->u} f_i ; f + sum_u a_{u->i} p_u] (N, C).
Refined edge weights, with a learned confidence K (N, M) of each node in each modality (confidence of the source):

    w_{u->i} = relu(max_m a^m_{u->i} K[u, m]),   w_{i->u} = relu(max_m a^m_{i->u} K[i, m])   (relu: the pruning)
    X^0 = normalize(E),  X^{l+1} = A_w X^l (sum over in-edges, weighted),  z = X^0 + ... + X^{n_layers}
    r = [z ; c_1 ; ... ; c_M] (N, d + M C),  s(u, i) = <r_u, r_i>
    L = BPR + gamma * ((2|e_u|^2 + |e_i+|^2 + |e_i-|^2) / (2 B d) + sum_m (mean(P_m^2) + mean(P_m[users]^2)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msi.losses import bpr_loss
from msi.models.base import Recommender, pair_keys
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config
    from msi.data.dataset import Dataset


def segment_softmax(scores: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Softmax of ``scores`` (E,) within each group (``group`` (E,) in 0..n_groups-1), shifted by each group's
    maximum (held constant: the softmax does not depend on it)."""
    top = scores.new_full((n_groups,), float("-inf")).scatter_reduce(0, group, scores.detach(), "amax")
    ex = (scores - top[group]).exp()
    return ex / ex.new_zeros(n_groups).index_add(0, group, ex)[group]


def aggregate(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """out (n, k) with out[dst_e] += w_e * x[src_e] over the edges e: a sparse product whose values ``w`` (E,) are
    learned, written as a gather and a scatter-add so that the gradient reaches ``w`` as well as ``x``."""
    return x.new_zeros(n, x.shape[1]).index_add(0, dst, w[:, None] * x[src])


class ModalityRefiner(nn.Module):
    """One modality: item content, routed user prototypes, the representation c_m and the edge affinities."""

    def __init__(self, features: torch.Tensor, n_users: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", features, persistent=False)
        self.project = nn.Linear(features.shape[1], dim)
        nn.init.xavier_normal_(self.project.weight)
        self.preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, dim)))

    def forward(self, users: torch.Tensor, items: torch.Tensor, n_routing: int):
        """(c_m (N, C), a_{u->i} (E,), a_{i->u} (E,)) for the train edges (users (E,), items (E,))."""
        n_users, n_items = self.preference.shape[0], self.features.shape[0]
        f = F.normalize(F.leaky_relu(self.project(self.features)))  # (I, C)
        p = F.normalize(self.preference)  # (U, C)
        for _ in range(n_routing):
            a = segment_softmax((p[users] * f[items]).sum(1), users, n_users)
            p = F.normalize(p + aggregate(items, users, a, f, n_users))
        s = (p[users] * f[items]).sum(1)  # (E,)
        to_item, to_user = segment_softmax(s, items, n_items), segment_softmax(s, users, n_users)
        users_rows = p + aggregate(items, users, to_user, f, n_users)
        return torch.cat([users_rows, f + aggregate(users, items, to_item, p, n_items)]), to_item, to_user


class GRCN(Recommender):
    """Args: sizes, the train pairs (n, 2) (the graph, and negatives reject them), the modalities' features
    {name: (I, F_m)}, and the hyper-parameters."""

    param_groups = {"refiners": "refiners", "confidence": "refiners", "id_emb": "embeddings"}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        train,
        features: dict[str, torch.Tensor],
        embedding_dim: int = 64,
        content_dim: int = 64,
        n_layers: int = 2,
        n_routing: int = 3,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.n_routing, self.gamma = (
            n_users, n_items, n_layers, n_routing, gamma)
        pairs = torch.from_numpy(np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0))
        self.register_buffer("edge_users", pairs[:, 0].contiguous(), persistent=False)
        self.register_buffer("edge_items", pairs[:, 1].contiguous(), persistent=False)
        self.register_buffer("train_keys", pair_keys(train, n_items), persistent=False)
        self.refiners = nn.ModuleDict(
            {m: ModalityRefiner(f.float(), n_users, content_dim) for m, f in features.items()})
        self.confidence = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users + n_items, len(features))))
        self.id_emb = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users + n_items, embedding_dim)))

    def edge_weights(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """((w_{u->i}, w_{i->u}) each (E,), the pruned refined weights; [c_m (N, C)] of each modality)."""
        u, i = self.edge_users, self.edge_items
        out = [r(u, i, self.n_routing) for r in self.refiners.values()]
        to_item = torch.stack([o[1] for o in out], 1) * self.confidence[u]  # (E, M)
        to_user = torch.stack([o[2] for o in out], 1) * self.confidence[self.n_users + i]
        return (F.relu(to_item.max(1).values), F.relu(to_user.max(1).values)), [o[0] for o in out]

    def _represent(self) -> torch.Tensor:
        """r (N, d + M C)."""
        (w_ui, w_iu), content = self.edge_weights()
        u, i, nu = self.edge_users, self.edge_items, self.n_users
        x = F.normalize(self.id_emb)
        z = x
        for _ in range(self.n_layers):
            x = torch.cat([aggregate(i, u, w_iu, x[nu:], nu), aggregate(u, i, w_ui, x[:nu], self.n_items)])
            z = z + x
        return torch.cat([z, *content], dim=1)

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
        prefs = sum(m.preference.pow(2).mean() + m.preference[users].pow(2).mean() for m in self.refiners.values())
        reg = ids / (2 * len(users) * e.shape[1]) + prefs
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class GRCNModel:
    """The model.* keys of model.name=grcn."""

    embedding_dim: int = key(64, "d: size of the ID embeddings (MMRec: embedding_size)", check=">0")
    content_dim: int = key(64, "C: size of each modality's content and user prototypes (MMRec: latent_embedding)",
                           check=">0")
    n_layers: int = key(2, "layers of the ID graph convolution over the refined graph (MMRec: 2, fixed)", check=">0")
    n_routing: int = key(3, "neighbour-routing passes that refine the user prototypes (MMRec: n_layers; its routing "
                         "leaves the prototypes unchanged, which is n_routing 0 here)", check=">=0")


@dataclass
class GRCNLoss:
    """The loss.* keys of model.name=grcn."""

    gamma: float = key(0.1, "L2 weight of the batch's ID embeddings and the user prototypes (MMRec: reg_weight)",
                       check=">=0")


@register("grcn", model=GRCNModel, loss=GRCNLoss)
def build(cfg: Config, data: Dataset) -> GRCN:
    """GRCN on ``data``'s train graph and every modality's features: ``model.embedding_dim``, ``model.content_dim``,
    ``model.n_layers``, ``model.n_routing`` and ``loss.gamma``."""
    m = cfg.model
    return GRCN(
        data.n_users, data.n_items, data.train, {name: torch.from_numpy(f) for name, f in data.features.items()},
        embedding_dim=m.embedding_dim, content_dim=m.content_dim, n_layers=m.n_layers, n_routing=m.n_routing,
        gamma=cfg.loss.gamma,
    )

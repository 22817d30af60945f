"""MSI (ICMR 2024) and its ablations, BM3 among them, as one module configured by arguments.

Forward pass (SPEC §2), d = embedding_dim, U users, I items, N = U + I:
    h_m   = W_m x_m                           (I, d)   one linear map per modality from raw features x_m (I, F_m)
    SSD:  mu_m, s_m = head_m(h_m); sigma_m = softplus(s_m) + 1e-6; the s rows of head_m start at zero
          sample_m = mu_m + sigma_m * eps (training), mu_m (eval);   without SSD: z_r^m = h_m
          L_ssd = -I(sample^a; sample^b) + beta * AKL over the batch's distinct items; I estimated by
          mi_estimator "infonce" (cosine InfoNCE, SPEC §2) or "jsd" (an MLP critic T(a, b) with the
          Jensen-Shannon bound, negatives (a_{j-1}, b_j), as the Multi-View Information Bottleneck does)
          code_placement "sample": z_r^m = sample_m everywhere (the paper's reading, SPEC §2);
                         "mean":   z_r^m = mu_m downstream, samples only inside L_ssd (Multi-View IB)
    IP:   Z_0 = [[z_u, z_u, z_u], [z_i, z_r^t, z_r^v]]   (N, 3d), one sparse product per layer for all three graphs
          z_s = mean(Z_0..Z_L), item rows + Z_0 (residual);  keep the ID graph's users and every graph's items
          (one layer, the default: the item rows of Â Z_0 are Â_IU z_u in all three graphs, so the readout is one
          I x d and one U x d product over Â's user-item blocks, base.one_layer_readout)
          without IP: only the ID graph is propagated and z_s^m = z_r^m
    CVG:  online view P(z), target view dropout(z) without gradient
    Score s(u, i) = <P(z_s^u), P(z_s^i)> (score_views "id"), or <P(z_s^u), P(z_s^i) + sum_m P(z_s^m)> ("all");
          the modality probe uses P(z_s^m) for the items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from msi.data.dataset import Dataset
from msi.data.graph import normalized_adjacency
from msi.errors import ConfigError
from msi.losses import average_kl, cosine_loss, frobenius_reg, info_nce, jsd_mi
from msi.models.base import Recommender, bipartite_blocks, lightgcn_readout, one_layer_readout
from msi.registry import key, register

if TYPE_CHECKING:
    from msi.config import Config

CODE_PLACEMENTS = ("sample", "mean")  # model.code_placement
MI_ESTIMATORS = ("infonce", "jsd")  # model.mi_estimator
SCORE_VIEWS = ("id", "all")  # model.score_views
HEAD_INITS = ("xavier", "identity")  # model.head_init
SIGMA_INIT = math.log(2.0)  # softplus(0): the starting sigma with the scale rows' bias at zero


class MSI(Recommender):
    """MSI with switches for every ablation of the paper.

    Args:
        n_users, n_items: sizes of the data set.
        adj: (N, N) sparse normalized adjacency of the train graph (``msi.data.normalized_adjacency``).
        features: ordered modality name -> raw features (I, F_m) float tensor (copied into the ``raw`` parameters).
        use_ssd: superfluous semantics discarding (needs exactly two modalities).
        use_ip: interaction preserving (LightGCN over the modality graphs).
        freeze_features: keep the raw features fixed (BM3 trains them).
        alpha, beta, gamma, w_align, w_mask: loss weights (L_ssd, AKL inside L_ssd, L_reg, L_align, L_mask).
        code_placement: where the sampled SSD code goes: "sample" (graphs and every loss) or "mean" (the means
            downstream, the samples only inside L_ssd).
        beta_warmup: epochs over which the AKL weight rises linearly from 0 to ``beta`` (0: off); the trainer
            calls ``start_epoch`` before each epoch.
        mi_estimator: the mutual-information estimate inside L_ssd: "infonce" or "jsd" (a critic MLP, trained
            with the model).
        score_views: "id" scores items by their ID-graph view, "all" by the sum of every view (scoring only: the
            loss terms are the same either way).
        sigma_init: every item's sigma at the start (up to the 1e-6 floor): the scale rows of each head start at
            zero and their bias at softplus^-1(sigma_init); the default ln 2 = softplus(0) leaves the bias at zero.
        head_init: the mean rows of each SSD head: "xavier" (Xavier-normal, bias zero) or "identity" (mu = h at
            the start: the identity matrix, bias zero).

    The loss weights stay in the constructor, beside the architecture: the trainer calls ``loss(users, items)``
    for every registered model alike, and a model's builder (``build`` below) is the one place that reads its config.
    """

    param_groups = {"user_emb": "embeddings", "item_emb": "embeddings", "proj": "projections", "head": "heads",
                    "predictor": "predictor", "raw": "features", "critic": "critic"}

    def __init__(
        self,
        n_users: int,
        n_items: int,
        adj: torch.Tensor,
        features: dict[str, torch.Tensor],
        embedding_dim: int = 64,
        n_layers: int = 1,
        dropout: float = 0.3,
        tau: float = 0.2,
        use_ssd: bool = True,
        use_ip: bool = True,
        freeze_features: bool = False,
        alpha: float = 0.1,
        beta: float = 1e-4,
        gamma: float = 0.1,
        w_align: float = 1.0,
        w_mask: float = 1.0,
        code_placement: str = "sample",
        beta_warmup: int = 0,
        mi_estimator: str = "infonce",
        score_views: str = "id",
        sigma_init: float = SIGMA_INIT,
        head_init: str = "xavier",
    ) -> None:
        super().__init__()
        if not features:
            raise ValueError("MSI needs at least one modality; use LightGCN for an ID-only model")
        if code_placement not in CODE_PLACEMENTS:
            raise ValueError(f"code_placement must be one of {CODE_PLACEMENTS}, got {code_placement!r}")
        if mi_estimator not in MI_ESTIMATORS:
            raise ValueError(f"mi_estimator must be one of {MI_ESTIMATORS}, got {mi_estimator!r}")
        if score_views not in SCORE_VIEWS:
            raise ValueError(f"score_views must be one of {SCORE_VIEWS}, got {score_views!r}")
        if beta_warmup < 0:
            raise ValueError(f"beta_warmup must be >= 0, got {beta_warmup}")
        if not sigma_init > 0:
            raise ValueError(f"sigma_init must be > 0, got {sigma_init}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if use_ssd and len(features) != 2:
            raise ValueError(f"use_ssd needs exactly two modalities, got {len(features)}: {list(features)}")
        self.n_users, self.n_items, self.n_layers = n_users, n_items, n_layers
        self.dropout, self.tau, self.use_ssd, self.use_ip = dropout, tau, use_ssd, use_ip
        self.alpha, self.beta, self.gamma, self.w_align, self.w_mask = alpha, beta, gamma, w_align, w_mask
        self.code_placement, self.beta_warmup = code_placement, beta_warmup
        self.mi_estimator, self.score_views = mi_estimator, score_views
        self.beta_factor = 1.0  # the fraction of beta in force this epoch (start_epoch)
        self.modalities = tuple(features)
        self.item_views = ("id", *self.modalities)
        d = embedding_dim
        self.register_buffer("adj", adj, persistent=False)
        # Â's user-item blocks: with one layer, the readout in two small products (base.one_layer_readout)
        blocks = bipartite_blocks(adj, n_users) if n_layers == 1 else None
        self.register_buffer("adj_ui", None if blocks is None else blocks[0], persistent=False)
        self.register_buffer("adj_iu", None if blocks is None else blocks[1], persistent=False)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.raw = nn.ParameterDict()
        self.proj = nn.ModuleDict()
        self.head = nn.ModuleDict()
        for m, feat in features.items():
            feat = feat.float()
            if feat.shape[0] != n_items:
                raise ValueError(f"features[{m!r}] has {feat.shape[0]} rows, expected n_items = {n_items}")
            self.raw[m] = nn.Parameter(feat.clone(), requires_grad=not freeze_features)
            self.proj[m] = nn.Linear(feat.shape[1], d)
            nn.init.xavier_normal_(self.proj[m].weight)
            if use_ssd:
                self.head[m] = self._ssd_head(d, sigma_init, head_init)
        self.predictor = nn.Linear(d, d)
        nn.init.xavier_normal_(self.predictor.weight)
        if use_ssd and mi_estimator == "jsd":  # T(a, b): (B, 2d) -> (B, 1)
            self.critic = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 2 * d), nn.ReLU(),
                                        nn.Linear(2 * d, 1))

    @staticmethod
    def _ssd_head(d: int, sigma_init: float, head_init: str) -> nn.Linear:
        """Linear(d, 2d) -> (mu, pre-softplus scale). Scale rows at zero, their bias softplus^-1(sigma_init): every
        sigma starts at sigma_init (docs/design.md); mean rows Xavier-normal or the identity, bias zero."""
        head = nn.Linear(d, 2 * d)
        nn.init.xavier_normal_(head.weight)
        nn.init.zeros_(head.bias)
        with torch.no_grad():
            head.weight[d:].zero_()
            if sigma_init != SIGMA_INIT:  # softplus^-1(y) = log(expm1(y)); the default keeps the bias exactly 0
                head.bias[d:] = math.log(math.expm1(sigma_init))
            if head_init == "identity":
                head.weight[:d] = torch.eye(d)
        return head

    @property
    def blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Â_UI, Â_IU) when the one-layer readout may use them, else None."""
        return None if self.adj_ui is None else (self.adj_ui, self.adj_iu)

    def start_epoch(self, epoch: int) -> None:
        """Set the AKL weight of epoch ``epoch`` (0-based): beta * min(1, epoch / beta_warmup)."""
        self.beta_factor = min(1.0, epoch / self.beta_warmup) if self.beta_warmup else 1.0

    def _modality_codes(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, ...]]]:
        """z_r^m for each modality (I, d), and (mu_m, sigma_m, sample_m) when SSD is on."""
        codes: dict[str, torch.Tensor] = {}
        gauss: dict[str, tuple[torch.Tensor, ...]] = {}
        for m in self.modalities:
            h = self.proj[m](self.raw[m])  # (I, d)
            if self.use_ssd:
                mu, s = self.head[m](h).chunk(2, dim=-1)
                sigma = F.softplus(s) + 1e-6
                sample = mu + sigma * torch.randn_like(sigma) if self.training else mu
                gauss[m] = (mu, sigma, sample)
                h = sample if self.code_placement == "sample" else mu
            codes[m] = h
        return codes, gauss

    def _propagate(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, tuple]]:
        """Pre-predictor representations {"user": (U, d), "id": (I, d), m: (I, d)}, the codes z_r^m and the
        SSD Gaussians (mu_m, sigma_m)."""
        codes, gauss = self._modality_codes()
        U, d = self.n_users, self.item_emb.shape[1]
        item_blocks = [self.item_emb] + ([codes[m] for m in self.modalities] if self.use_ip else [])
        if self.blocks is not None:  # one layer: two block products
            user_rows, item_rows = one_layer_readout(self.blocks, self.user_emb, item_blocks)
            views = [z + x for z, x in zip(item_rows, item_blocks)]  # residual of eq. 17, every graph
        else:
            x0_items = torch.cat(item_blocks, dim=1)  # (I, g*d)
            x0 = torch.cat([self.user_emb.repeat(1, len(item_blocks)), x0_items], dim=0)
            # (N, g*d): g graphs side by side, one sparse product per layer
            z = lightgcn_readout(self.adj, x0, self.n_layers)
            # split, not slices: the backward of a split is one concatenation, that of each slice a zero-filled
            # (N, g*d)
            z_users, z_items = z.split([U, self.n_items])
            user_rows = z_users.split(d, dim=1)[0]
            views = (z_items + x0_items).split(d, dim=1)  # residual of eq. 17 on item rows, every graph
        out = {"user": user_rows, "id": views[0]}
        for g, m in enumerate(self.modalities):
            out[m] = views[g + 1] if self.use_ip else codes[m]
        return out, codes, gauss

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        """Final (post-predictor) representations used for scoring: user (U, d), id and each modality (I, d)."""
        out, _, _ = self._propagate()
        emb = {k: self.predictor(v) for k, v in out.items()}
        if self.score_views == "all":  # the views stay as they are for the modality probe
            emb["id"] = emb["id"] + sum(emb[m] for m in self.modalities)
        return emb

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for a batch of positive pairs (B,) and (B,); the key "loss" holds the weighted total."""
        out, codes, gauss = self._propagate()
        P, p = self.predictor, self.dropout
        u, i = out["user"][users], out["id"][items]  # (B, d)
        # target views: stop-gradient, dropout always on. detach(), not no_grad(): dropout with p = 0 returns its
        # input itself, which would let the gradient through
        u_t, i_t = F.dropout(u.detach(), p, training=True), F.dropout(i.detach(), p, training=True)
        terms = {"rec": cosine_loss(P(u), i_t) + cosine_loss(P(i), u_t)}
        align = mask = torch.zeros((), device=u.device)
        for m in self.modalities:
            z = out[m][items]
            z_t = F.dropout(z.detach(), p, training=True)
            z_on = P(z)
            align = align + cosine_loss(z_on, i_t)
            mask = mask + cosine_loss(z_on, z_t)
        terms["align"], terms["mask"] = align, mask
        reg_mats = [out["user"], out["id"]] + ([out[m] for m in self.modalities] if self.use_ip else [])
        terms["reg"] = frobenius_reg(*reg_mats, denominator=self.n_items)
        total = terms["rec"] + self.w_align * align + self.w_mask * mask + self.gamma * terms["reg"]
        if self.use_ssd:
            terms.update(self._ssd_terms(items, gauss))
            total = total + self.alpha * terms["ssd"]
        terms["loss"] = total
        return terms

    def _ssd_terms(self, items: torch.Tensor, gauss: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """L_ssd = -I(sample^a; sample^b) + beta * AKL over the distinct items of the batch; the estimate of I is
        logged as ``nce`` (InfoNCE) or ``jsd`` (the critic's Jensen-Shannon bound)."""
        a, b = self.modalities
        uniq = torch.unique(items)
        (mu_a, sd_a, z_a), (mu_b, sd_b, z_b) = (tuple(t[uniq] for t in gauss[m]) for m in (a, b))
        if self.mi_estimator == "infonce":
            name, mi = "nce", info_nce(z_a, z_b, self.tau)
        else:  # negatives: each b with the previous item's a (a derangement of the batch, as MIB rolls it)
            pos = self.critic(torch.cat([z_a, z_b], dim=1)).squeeze(1)  # (B,)
            neg = self.critic(torch.cat([z_a.roll(1, dims=0), z_b], dim=1)).squeeze(1)  # (B,)
            name, mi = "jsd", jsd_mi(pos, neg)
        akl = average_kl(mu_a, sd_a, mu_b, sd_b)
        return {name: mi, "akl": akl, "ssd": -mi + self.beta * self.beta_factor * akl}

    @torch.no_grad()
    def code_stats(self) -> dict[str, float]:
        """What SSD does to the modality codes, over all items in eval mode (z_r = mu; no RNG is drawn):
        ``sigma_<m>`` the mean sigma per modality (SSD only), ``cos_pair`` the mean cosine between an item's first
        two modality codes, ``cos_random`` the same for random item pairs (a fixed permutation)."""
        was_training = self.training
        self.eval()
        codes, gauss = self._modality_codes()
        self.train(was_training)
        out = {f"sigma_{m}": float(g[1].mean()) for m, g in gauss.items()}
        if len(self.modalities) >= 2:
            a, b = (F.normalize(codes[m], dim=-1) for m in self.modalities[:2])
            perm = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(0)).to(a.device)
            out["cos_pair"] = float((a * b).sum(-1).mean())
            out["cos_random"] = float((a * b[perm]).sum(-1).mean())
        return out


@dataclass
class MSIModel:
    """The model.* keys of model.name=msi."""

    embedding_dim: int = key(64, "d: size of every embedding", check=">0")
    n_layers: int = key(1, "L: LightGCN layers of every graph", check=">=0")
    dropout: float = key(0.3, "p of the target-view dropout (contrastive view generator)", check="[0,1)")
    tau: float = key(0.2, "InfoNCE temperature of the SSD module", check=">0")
    use_ssd: bool = key(True, "superfluous semantics discarding (Gaussian encoders, InfoNCE + AKL)")
    use_ip: bool = key(True, "interaction preserving (modality LightGCN graphs)")
    freeze_features: bool = key(False, "keep raw item features fixed (BM3 trains them)")
    code_placement: str = key("sample", "sample: SSD samples feed graphs and losses | mean: means downstream, "
                              "samples only in L_ssd", choices=CODE_PLACEMENTS)
    mi_estimator: str = key("infonce", "infonce: cosine InfoNCE (SPEC) | jsd: MLP critic with the Jensen-Shannon "
                            "bound (MIB)", choices=MI_ESTIMATORS)
    score_views: str = key("id", "id: score items with P z_s^i (SPEC) | all: P z_s^i + sum_m P z_s^m",
                           choices=SCORE_VIEWS)
    sigma_init: float = key(SIGMA_INIT, "every item's SSD sigma at the start (default ln 2 = softplus(0): the scale "
                            "rows' bias at zero)", check=">0")
    head_init: str = key("xavier", "the mean rows of each SSD head: xavier | identity (mu = h at the start)",
                         choices=HEAD_INITS)

    def validate(self, cfg: Config) -> None:
        n = len(cfg.data.modalities)
        if self.use_ssd and n != 2:
            raise ConfigError(f"model.use_ssd needs exactly two modalities (got {n}: {list(cfg.data.modalities)}); "
                              "set model.use_ssd=false or list two in data.modalities")


@dataclass
class MSILoss:
    """The loss.* keys of model.name=msi."""

    alpha: float = key(0.1, "weight of L_ssd", check=">=0")
    beta: float = key(1e-4, "weight of the average KL inside L_ssd", check=">=0")
    beta_warmup: int = key(0, "epochs over which beta rises linearly from 0 to its value (0: off)", check=">=0")
    gamma: float = key(0.1, "weight of L_reg, the L2 of the batch's embeddings (BM3's reg_weight)", check=">=0")
    w_align: float = key(1.0, "weight of L_align (BM3: cl_weight 2.0)", check=">=0")
    w_mask: float = key(1.0, "weight of L_mask (BM3: cl_weight 2.0)", check=">=0")


@register("msi", model=MSIModel, loss=MSILoss)
def build(cfg: Config, data: Dataset) -> MSI:
    """MSI (or the ablation that ``model.use_ssd`` / ``model.use_ip`` / the loss weights name) for ``data``'s train
    graph and item features."""
    m, lo = cfg.model, cfg.loss
    return MSI(
        data.n_users, data.n_items, normalized_adjacency(data.train, data.n_users, data.n_items),
        {name: torch.from_numpy(f) for name, f in data.features.items()},
        embedding_dim=m.embedding_dim, n_layers=m.n_layers, dropout=m.dropout, tau=m.tau, use_ssd=m.use_ssd,
        use_ip=m.use_ip, freeze_features=m.freeze_features, code_placement=m.code_placement,
        alpha=lo.alpha, beta=lo.beta, gamma=lo.gamma, w_align=lo.w_align, w_mask=lo.w_mask,
        beta_warmup=lo.beta_warmup, mi_estimator=m.mi_estimator, score_views=m.score_views,
        sigma_init=m.sigma_init, head_init=m.head_init,
    )

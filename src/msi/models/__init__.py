"""Models: MSI (and its ablations, BM3 among them) and the LightGCN baseline, behind one small interface."""

from __future__ import annotations

import torch

from msi.config import Config
from msi.data.dataset import Dataset
from msi.data.graph import normalized_adjacency
from msi.models.base import Recommender, grad_norms, lightgcn_readout, mask_rows
from msi.models.lightgcn import LightGCN
from msi.models.msi import MSI
from msi.models.popularity import Popularity


def build_model(cfg: Config, dataset: Dataset, with_features: bool = True) -> Recommender:
    """The model that ``cfg.model.name`` names, on the CPU, for ``dataset``.

    ``with_features=False`` builds MSI from the feature widths only (the values come from a checkpoint).
    """
    m, lo = cfg.model, cfg.loss
    adj = normalized_adjacency(dataset.train, dataset.n_users, dataset.n_items)
    if m.name == "lightgcn":
        return LightGCN(
            dataset.n_users, dataset.n_items, adj, dataset.train,
            embedding_dim=m.embedding_dim, n_layers=m.n_layers, gamma=lo.gamma,
        )
    features = {
        name: torch.from_numpy(f) if with_features else f.shape[1] for name, f in dataset.features.items()
    }
    return MSI(
        dataset.n_users, dataset.n_items, adj, features,
        embedding_dim=m.embedding_dim, n_layers=m.n_layers, dropout=m.dropout, tau=m.tau, use_ssd=m.use_ssd,
        use_ip=m.use_ip, freeze_features=m.freeze_features, code_placement=m.code_placement,
        alpha=lo.alpha, beta=lo.beta, gamma=lo.gamma, w_align=lo.w_align, w_mask=lo.w_mask,
        beta_warmup=lo.beta_warmup, mi_estimator=m.mi_estimator, score_views=m.score_views,
    )


def epoch_diagnostics(model: Recommender) -> dict[str, float]:
    """What the trainer adds to an epoch's metrics row: the gradient norm of each parameter group at the epoch's
    last step, and the model's code statistics (``code_stats``; MSI's SSD scales and cosines)."""
    return {**grad_norms(model), **model.code_stats()}


__all__ = ["MSI", "epoch_diagnostics", "grad_norms", "LightGCN", "Popularity", "Recommender", "build_model", "lightgcn_readout", "mask_rows"]

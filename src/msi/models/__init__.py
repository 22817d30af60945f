"""Models: MSI (and its ablations, BM3 among them) and the baselines (LightGCN, BPR, VBPR, DualGNN, BUIR, popularity),
behind one small interface.

Each model registers its builder under its name (``@register("msi")`` beside the class, msi.registry); importing
this package registers the built-in ones. ``build_model`` asks the registry for ``cfg.model.name`` and knows no
model by name. docs/adding_a_model.md shows how a package of one's own adds a model.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from msi.data.dataset import Dataset
from msi.data.graph import interaction_csr
from msi.errors import MSIError, raised
from msi.models.base import Recommender, grad_norms, lightgcn_readout, mask_rows
from msi.models.bpr import BPR
from msi.models.buir import BUIR
from msi.models.dualgnn import DualGNN
from msi.models.freedom import FREEDOM
from msi.models.grcn import GRCN
from msi.models.lattice import LATTICE
from msi.models.lightgcn import LightGCN
from msi.models.mmgcn import MMGCN
from msi.models.msi import MSI
from msi.models.popularity import Popularity
from msi.models.vbpr import VBPR
from msi.registry import get, key, register

if TYPE_CHECKING:
    from msi.config import Config


def build_model(cfg: Config, dataset: Dataset, with_features: bool = True) -> Recommender:
    """The model that ``cfg.model.name`` names, on the CPU, for ``dataset``, its ``seen`` set to the train items
    (``recommend`` leaves them out by default).

    ``with_features=False``: zeros stand in for the item features' values, for a caller that needs only the
    model's parameter names and shapes.
    """
    if not with_features:
        zeros = {m: np.zeros(f.shape, np.float32) for m, f in dataset.features.items()}
        dataset = dataclasses.replace(dataset, features=zeros)
    entry = get(cfg.model.name)
    try:
        model = entry.build(cfg, dataset)
    except (MSIError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # a plugin's builder: one line naming it, not its traceback
        raise MSIError(f"the builder of model {entry.name!r} ({entry.build.__module__}) raised {raised(e)}") from None
    if not isinstance(model, Recommender):
        raise MSIError(f"the builder of model {entry.name!r} returned a {type(model).__name__}, not a "
                       "msi.models.Recommender")
    model.seen = interaction_csr(dataset.train, dataset.n_users, dataset.n_items)
    return model


def epoch_diagnostics(model: Recommender) -> dict[str, float]:
    """What the trainer adds to an epoch's metrics row: the gradient norm of each parameter group at the epoch's
    last step, and the model's code statistics (``code_stats``; MSI's SSD scales and cosines)."""
    return {**grad_norms(model), **model.code_stats()}


__all__ = ["BPR", "BUIR", "DualGNN", "FREEDOM", "GRCN", "LATTICE", "MMGCN", "MSI", "LightGCN", "Popularity",
           "Recommender", "VBPR", "build_model", "epoch_diagnostics", "grad_norms", "lightgcn_readout", "key",
           "mask_rows", "register"]

"""What a run needs before its loop: a seed, a device, the data set (generated on first use), a restored model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msi.checkpoint import check_matches_data, load_checkpoint
from msi.config import Config, config_from_dict
from msi.data.dataset import Dataset, load_dataset
from msi.errors import ConfigError
from msi.models import Recommender, build_model


def seed_everything(seed: int) -> None:
    """One seed for every RNG: python, numpy, torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but this torch build sees no CUDA GPU")
    return device


def dataset_for(cfg: Config, progress: bool = True) -> Dataset:
    """Load the configured data set; generate it first when it is missing and ``data.synth_preset`` is set."""
    d = cfg.data
    folder = Path(d.root) / d.name
    if d.synth_preset and not (folder / f"{d.name}.inter").is_file():
        from msi.data.synth import generate

        print(f"generating the '{d.synth_preset}' data set into {folder} (seed {d.synth_seed}) ...")
        generate(d.synth_preset, folder, seed=d.synth_seed, name=d.name, progress=progress)
    modalities = {} if cfg.model.name == "lightgcn" else d.modalities
    return load_dataset(d.root, d.name, modalities)


def data_signature(dataset: Dataset) -> dict[str, Any]:
    return {
        "name": dataset.name,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "features": {m: int(f.shape[1]) for m, f in dataset.features.items()},
    }


def restore(path: str | Path, device: torch.device | str = "cpu") -> tuple[Recommender, Config, Dataset]:
    """Rebuild the model of a checkpoint with its config and data set, in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    dataset = dataset_for(cfg, progress=False)
    check_matches_data(ckpt, path, dataset.n_users, dataset.n_items, data_signature(dataset)["features"])
    model = build_model(cfg, dataset, with_features=False)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, cfg, dataset

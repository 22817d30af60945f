"""What a run needs around its loop: a seed, a device, the data set (generated on first use), and ``open_run``, the
one way to open a checkpoint against a data set (resume, the trainer's finish, msi-eval and msi-recommend use it)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from msi import registry
from msi.checkpoint import check_matches_data, check_weights, data_signature, first_non_finite, load_checkpoint
from msi.config import Config, config_from_dict
from msi.data.dataset import Dataset, load_dataset
from msi.errors import CheckpointError, ConfigError, shown
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
        raise ConfigError(f"unknown device {shown(name)}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # torch knows mps, meta, xpu, ...: msi runs on neither
        raise ConfigError(f"device {shown(name)}: msi runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {shown(name)} was asked for, but this torch build sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {shown(name)}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                          "from 0")
    return device


def dataset_for(cfg: Config, progress: bool = True) -> Dataset:
    """Load the configured data set; when it is missing and ``data.name`` is ``data.synth_preset``, generate it first.

    Only the preset's own folder name is generated into: a mistyped ``data.name`` is a "does not exist" error
    listing the data sets there, not a new generated set (``msi-data synth --name`` generates under any name).
    """
    d = cfg.data
    folder = Path(d.root) / d.name
    if d.synth_preset and d.name == d.synth_preset and not (folder / f"{d.name}.inter").is_file():
        from msi.data.synth import generate

        print(f"generating the '{d.synth_preset}' data set into {folder} (seed {d.synth_seed}) ...")
        generate(d.synth_preset, folder, seed=d.synth_seed, name=d.name, progress=progress)
    modalities = d.modalities if registry.get(cfg.model.name).item_features else {}
    return load_dataset(d.root, d.name, modalities)


class OpenRun(NamedTuple):
    """What ``open_run`` returns; unpacks as ``model, cfg, dataset, checkpoint = open_run(path)``."""

    model: Recommender
    cfg: Config
    dataset: Dataset
    checkpoint: dict[str, Any]


def open_run(
    path: str | Path, device: torch.device | str = "cpu", dataset: Dataset | None = None,
    allow_other_data: bool = False,
) -> OpenRun:
    """Open a checkpoint (a best.pt or last.pt) against its data set: the model in eval mode on ``device``.

    ``dataset``: the data set to check against (default: the one the checkpoint's config names, loaded here).
    The data must match the checkpoint's sizes and fingerprint (``allow_other_data`` accepts another fingerprint
    of the same shapes); weights holding NaN or inf are refused.
    """
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its saved config does not load ({e})") from None
    dataset = dataset_for(cfg, progress=False) if dataset is None else dataset
    check_matches_data(ckpt, path, data_signature(dataset), allow_other_data)
    bad = first_non_finite(ckpt["model"])
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or inf values; the model is not usable")
    model = build_model(cfg, dataset)
    check_weights(ckpt["model"], model.state_dict(), path)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return OpenRun(model, cfg, dataset, ckpt)

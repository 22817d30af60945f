"""Checkpoints: plain versioned dicts, written atomically, read with ``weights_only=True`` (never run code)."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msi import __version__
from msi.errors import CheckpointError

FORMAT = "msi-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "msi_version", "config", "model", "epoch", "data")


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format header) to ``path`` atomically: a temporary file, then a rename.

    A failed write (a full disk) is a CheckpointError naming ``path``; the file there before stays as it was.
    """
    path = Path(path)
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "msi_version": __version__, **payload}
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
        raise CheckpointError(f"{path}: could not write the checkpoint ({cause}); the earlier one is kept") from None
    finally:
        tmp.unlink(missing_ok=True)


def temporary_path(path: Path) -> Path:
    """Where ``save_checkpoint`` writes before the rename: ``.<name>.tmp-<pid>`` beside ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing, truncated, unsafe or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to reload with weights_only=False (and ANSI codes); keep only the
        # name of the offending global, when there is one
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects other than tensors and plain values "
                f"(e.g. {found.group(1)})"
            ) from None
        raise CheckpointError(f"{path}: not a checkpoint (torch.load cannot read it)") from None
    except Exception as e:  # a text file, a truncated zip, ...: torch raises many types (KeyError, IndexError)
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({type(e).__name__}: {e})".split("\n")[0]) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msi checkpoint (no '{FORMAT}' header)")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete msi checkpoint, missing {', '.join(missing)}")
    if obj["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {obj['format_version']} is newer than this msi ({__version__}) reads"
        )
    return obj


def check_matches_data(
    ckpt: dict[str, Any], path: str | Path, signature: dict[str, Any], allow_other_data: bool = False
) -> None:
    """Refuse a checkpoint trained on another data set.

    ``signature`` is the data set's (``msi.run.data_signature``). Other sizes or feature widths are always an
    error (the weights cannot fit); another fingerprint (the same shapes, other rows) is one unless
    ``allow_other_data``. Checkpoints written before fingerprints existed are compared by shape only.
    """
    d = ckpt["data"]
    shapes = (d["n_users"], d["n_items"], dict(d["features"]))
    if shapes != (signature["n_users"], signature["n_items"], dict(signature["features"])):
        raise CheckpointError(
            f"{path}: trained on {d['n_users']} users, {d['n_items']} items, features {dict(d['features'])}, "
            f"but the data set has {signature['n_users']} users, {signature['n_items']} items, features "
            f"{dict(signature['features'])}"
        )
    if not allow_other_data and d.get("fingerprint", signature["fingerprint"]) != signature["fingerprint"]:
        raise CheckpointError(
            f"{path}: trained on other data of the same shape (data fingerprint {d['fingerprint'][:12]}, "
            f"the data set '{signature['name']}' has {signature['fingerprint'][:12]}); pass --allow-other-data "
            "to use it anyway"
        )


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of a model state holding NaN or inf, or None when all are finite."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None

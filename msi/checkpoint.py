"""Checkpoints: plain versioned dicts, written atomically, read with ``weights_only=True`` (never run code)."""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
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
    """Write ``payload`` (plus the format header) to ``path`` atomically: a temporary file, then a rename."""
    path = Path(path)
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "msi_version": __version__, **payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing, truncated, unsafe or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to reload with weights_only=False (and ANSI codes); keep only the
        # name of the offending global
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"e.g. {found.group(1)}" if found else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors and plain values ({what})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
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


def check_matches_data(ckpt: dict[str, Any], path: str | Path, n_users: int, n_items: int, widths: dict) -> None:
    """A checkpoint trained on another data set (other sizes or feature widths) is an error."""
    d = ckpt["data"]
    if (d["n_users"], d["n_items"]) != (n_users, n_items) or dict(d["features"]) != dict(widths):
        raise CheckpointError(
            f"{path}: trained on {d['n_users']} users, {d['n_items']} items, features {dict(d['features'])}, "
            f"but the data set has {n_users} users, {n_items} items, features {dict(widths)}"
        )

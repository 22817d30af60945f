"""Checkpoints: plain versioned dicts, written atomically, read with ``weights_only=True`` (never run code); the
signature of the data set a checkpoint was trained on, made (``data_signature``) and checked
(``check_matches_data``)."""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msi import __version__
from msi.data.dataset import Dataset
from msi.errors import CheckpointError, shown
from msi.files import owned, writing

FORMAT = "msi-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "msi_version", "config", "model", "epoch", "data")
_ZIP_TAIL = 65_557  # a zip's end-of-directory record lies in its last 22 + 65535 (comment) bytes


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
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "msi_version": __version__, **payload}
    try:
        with writing(path, owned, "msi-train", error=CheckpointError, what="checkpoint") as tmp:
            torch.save(obj, tmp)
    except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise CheckpointError(f"{path}: could not write the checkpoint ({str(e).splitlines()[0]}); the earlier file, "
                              "if any, is kept") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing, truncated, unsafe, foreign or malformed file is a CheckpointError.

    Malformed means a payload that loads safely but does not have the types an msi checkpoint holds
    (``not an msi checkpoint: <what is wrong>``); whether its weights fit a model is ``check_weights``' job.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint: name a file in it (e.g. {path / 'best.pt'})")
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
        raise CheckpointError(_unreadable(path, e)) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msi checkpoint: no '{FORMAT}' header")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete msi checkpoint, missing {', '.join(missing)}")
    version = obj["format_version"]
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: not an msi checkpoint: format_version is {shown(version)}, not a positive "
                              "integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this msi ({__version__}) reads")
    problem = _malformed(obj)
    if problem:
        raise CheckpointError(f"{path}: not an msi checkpoint: {problem}")
    return obj


def _unreadable(path: Path, error: Exception) -> str:
    """The message for a file torch.load cannot read: empty, a truncated zip archive (torch.save's format), or
    something else."""
    size = path.stat().st_size
    if size == 0:
        return f"{path}: empty file, not a checkpoint"
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - _ZIP_TAIL))
        tail = f.read()
    if head == b"PK\x03\x04" and b"PK\x05\x06" not in tail:  # a zip without its end-of-directory record
        return f"{path}: truncated checkpoint: the zip archive stops after {size} bytes (an interrupted copy?)"
    return f"{path}: not an msi checkpoint: torch.load cannot read it ({type(error).__name__}: {error})".split("\n")[0]


def _malformed(obj: dict[str, Any]) -> str | None:
    """What is wrong with the types of a checkpoint's payload, or None when it has those of an msi checkpoint."""
    for key in ("config", "model", "data"):
        if not isinstance(obj[key], dict):
            return f"{key} is {_kind(obj[key])}, not a mapping"
    if not obj["model"]:
        return "model holds no weights"
    for name, value in obj["model"].items():
        if not isinstance(value, torch.Tensor):
            return f"model weight {shown(name)} is {_kind(value)}, not a tensor"
    if type(obj["epoch"]) is not int or obj["epoch"] < 0:
        return f"epoch is {shown(obj['epoch'])}, not a count of epochs"
    data = obj["data"]
    for key in ("n_users", "n_items"):
        if key not in data:
            return f"data has no {key}"
        if type(data[key]) is not int or data[key] < 1:
            return f"data.{key} is {shown(data.get(key))}, not a positive integer"
    features = data.get("features")
    if not isinstance(features, dict) or not all(isinstance(m, str) and type(w) is int for m, w in features.items()):
        return f"data.features is {shown(features)}, not a mapping of modality names to widths"
    if not isinstance(data.get("fingerprint", ""), str):
        return f"data.fingerprint is {_kind(data['fingerprint'])}, not a string"
    return _malformed_resume_state(obj)


def _malformed_resume_state(obj: dict[str, Any]) -> str | None:
    """What is wrong with the types of the resume state (progress, and last.pt's optimizer and rng), or None."""
    for key in ("progress", "optimizer", "rng"):
        if key in obj and not isinstance(obj[key], dict):
            return f"{key} is {_kind(obj[key])}, not a mapping"
    progress = obj.get("progress", {})
    for key in ("epoch", "best_epoch", "bad_evals"):
        if key in progress and (type(progress[key]) is not int or progress[key] < 0):
            return f"progress.{key} is {shown(progress[key])}, not a count"
    optimizer = obj.get("optimizer", {"state": {}, "param_groups": []})
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        return "optimizer is not an optimizer's state (a mapping of state and param_groups)"
    if "rng" in obj and sorted(obj["rng"]) != sorted(rng_state()):
        return f"rng holds {sorted(obj['rng'])}, not the random states {sorted(rng_state())}"
    return None


def _kind(value: Any) -> str:
    """``None``, ``a list``, ``an int``: what a value is, for a message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a checkpoint's model weights that do not fit the model its config builds (``expected``: that model's
    ``state_dict()``): a weight missing, one too many, or one of another shape."""
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: not an msi checkpoint: model has no weight {shown(name)}")
        if state[name].shape != tensor.shape or state[name].is_floating_point() != tensor.is_floating_point():
            raise CheckpointError(
                f"{path}: not an msi checkpoint: model weight {shown(name)} is {state[name].dtype} of shape "
                f"{tuple(state[name].shape)}, its config's model needs {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
    extra = [name for name in state if name not in expected]
    if extra:
        raise CheckpointError(f"{path}: not an msi checkpoint: model holds weights its config's model does not "
                              f"have ({', '.join(extra)})")


def data_signature(dataset: Dataset) -> dict[str, Any]:
    """Sizes, feature widths and a fingerprint of a data set, stored in every checkpoint.

    The fingerprint is a SHA-256 over the train/valid/test rows and the feature shapes (not the feature values:
    hashing Elec's 1 GB of image features would cost seconds at every open).
    """
    h = hashlib.sha256()
    for split in (dataset.train, dataset.valid, dataset.test):
        h.update(np.ascontiguousarray(split, dtype=np.int64).tobytes())
        h.update(b"|")
    h.update(repr(sorted((m, f.shape) for m, f in dataset.features.items())).encode())
    return {
        "name": dataset.name,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "features": {m: int(f.shape[1]) for m, f in dataset.features.items()},
        "fingerprint": h.hexdigest(),
    }


def check_matches_data(
    ckpt: dict[str, Any], path: str | Path, signature: dict[str, Any], allow_other_data: bool = False
) -> None:
    """Refuse a checkpoint trained on another data set.

    ``signature`` is the data set's (``data_signature``). Other sizes or feature widths are always an
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

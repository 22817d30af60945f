"""Small shared fixtures: a writer for hand-made MMRec data sets and one tiny data set for model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msi.data.dataset import Dataset, load_dataset

MODALITIES = {"image": "image_feat.npy", "text": "text_feat.npy"}


def _write_dataset(root: Path, name: str, inter: str, features: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``<root>/<name>/<name>.inter`` byte for byte (``inter`` keeps its own line endings) and each
    feature array as ``<root>/<name>/<file>``; return the .inter path."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    path.write_bytes(inter.encode())
    for file, arr in (features or {}).items():
        np.save(folder / file, arr)
    return path


def _random_dataset(n_users: int = 40, n_items: int = 24, per_user: int = 6, seed: int = 0) -> Dataset:
    """A stand-in for the generated ``tiny`` set: planted user/item factors drive interactions and features."""
    rng = np.random.default_rng(seed)
    fu, fi = rng.standard_normal((n_users, 4)), rng.standard_normal((n_items, 4))
    pairs = np.array([(u, i) for u in range(n_users) for i in np.argsort(-(fu[u] @ fi.T))[:per_user]])
    image = (fi @ rng.standard_normal((4, 12)) + 0.1 * rng.standard_normal((n_items, 12))).astype(np.float32)
    text = (fi @ rng.standard_normal((4, 8)) + 0.1 * rng.standard_normal((n_items, 8))).astype(np.float32)
    empty = np.zeros((0, 2), dtype=np.int64)
    return Dataset("random", Path("."), n_users, n_items, pairs, empty, empty, {"image": image, "text": text})


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test tensors are tiny: extra threads only add overhead, and on a busy shared CPU a lot of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_dataset():
    """``write_dataset(root, name, inter_text, {file: array})`` -> the .inter path (see ``_write_dataset``)."""
    return _write_dataset


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The generated ``tiny`` preset (60 users, 40 items) when ``msi.data.synth`` is there, else random data."""
    try:
        from msi.data.synth import generate
    except ImportError:
        return _random_dataset()
    root = tmp_path_factory.mktemp("synth")
    generate("tiny", root / "tiny", seed=0)
    return load_dataset(root, "tiny", MODALITIES)

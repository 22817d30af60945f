"""Small shared fixtures: a writer for hand-made MMRec data sets and one tiny data set for model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msi.data.dataset import Dataset, load_dataset
from msi.data.synth import generate

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
    """The generated ``tiny`` preset (60 users, 40 items)."""
    root = tmp_path_factory.mktemp("synth")
    generate("tiny", root / "tiny", seed=0, progress=False)
    return load_dataset(root, "tiny", MODALITIES)

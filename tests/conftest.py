"""Small shared fixtures: a writer for hand-made MMRec data sets and one tiny data set for model tests."""

from __future__ import annotations

import csv
import json
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


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch):
    """The suite sees the built-in models only, whatever model plugins the user has installed (one named like a
    test's model, or a broken one, changes nothing here); tests of plugins declare theirs (tests/test_registry.py),
    and the plugin the CLI tests install has a name no user plugin takes (``msi-suite-mf``)."""
    from msi import registry

    monkeypatch.setattr(registry, "_plugin_points", lambda: {})


@pytest.fixture
def write_dataset():
    """``write_dataset(root, name, inter_text, {file: array})`` -> the .inter path (see ``_write_dataset``)."""
    return _write_dataset


def recommended_train_pairs(recs: Path, inter: Path) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """The rows of msi-recommend's TSV ``recs``, and those of its (userID, itemID) pairs that are train rows of the
    .inter file ``inter`` (read straight from the file, not through the library)."""
    with open(recs, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    lines = inter.read_text().splitlines()
    header = lines[0].split("\t")
    u, i, x = (header.index(c) for c in ("userID", "itemID", "x_label"))
    train = {(r[u], r[i]) for r in (line.split("\t") for line in lines[1:] if line.strip()) if r[x] == "0"}
    return rows, [(r["userID"], r["itemID"]) for r in rows if (r["userID"], r["itemID"]) in train]


def pinned_rows(model, tiny: Dataset, lr: float, epochs: int = 3) -> list[dict]:
    """The rows of ``epochs`` epochs of msi.train.run_epoch over ``tiny``'s train pairs (batch 64, Adam at ``lr``,
    torch's RNG seeded 2 first), each after ``model.start_epoch`` as the trainer calls it: what the models'
    pinned-trajectory tests compare with recorded numbers."""
    from msi.train import make_optimizer, run_epoch

    opt = make_optimizer(model, lr)
    torch.manual_seed(2)
    rows = []
    for e in range(epochs):
        model.start_epoch(e)
        rows.append(run_epoch(model, opt, torch.from_numpy(tiny.train), 64, e))
    return rows


def assert_trajectory(rows: list[dict], reference: list[dict]) -> None:
    """Each epoch's row holds the reference's terms to rel 1e-5, for as many epochs as the reference records."""
    assert len(rows) == len(reference)
    for row, want in zip(rows, reference):
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-5)


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (scripts are not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The generated ``tiny`` preset (60 users, 40 items)."""
    root = tmp_path_factory.mktemp("synth")
    generate("tiny", root / "tiny", seed=0, progress=False)
    return load_dataset(root, "tiny", MODALITIES)


GRID = ["loss.alpha=0.1,0.01", "eval.ks=[10,20],[10,20,50]"]


def _fabricate_sweep(out: Path, valid: dict[str, dict[tuple[str, ...], list]], seeds: tuple[int, ...] = (1, 2),
                     overrides: tuple[str, ...] = (), grid: list[str] = GRID) -> Path:
    """A sweep folder of made-up run directories over ``grid`` (``GRID`` unless given), no training.
    ``valid[config][point]`` lists per seed ``(recall@20, ndcg@10, with_test)`` for a finished run, ``"partial"``
    (last.pt only) or ``"stopped"`` (stopped.json); a config's ``train.metric`` is ``ndcg@10`` when its name starts
    with ``ndcg``. A run written without test metrics (an empty ``test``) makes any reading of them fail.
    ``overrides``: the sweep's ``--set``."""
    from msi.sweepdir import plan_trials, record_sweep

    configs = []
    for name in valid:
        path = out.parent / f"{name}.yaml"
        metric = "ndcg@10" if name.startswith("ndcg") else "recall@20"
        path.write_text("data: {root: data, name: tiny, synth_preset: tiny}\nmodel: {embedding_dim: 16}\n"
                        f"train: {{epochs: 3, metric: '{metric}', device: cpu}}\n")
        configs.append(path)
    record_sweep(out, configs, grid, list(seeds), list(overrides))
    for t in plan_trials(configs, grid, list(seeds), out):
        state = valid[t.config.stem][t.point][list(seeds).index(t.seed)]
        t.run_dir.mkdir(parents=True)
        (t.run_dir / "config.yaml").write_text(f"train: {{seed: {t.seed}, metric: recall@20}}\n")
        (t.run_dir / "metrics.jsonl").write_text(
            "".join(f'{{"loss": {1 / e}, "rec": {0.5 / e}, "epoch": {e}, "grad_id": 0.1, '
                    f'"valid": {{"recall@20": {0.1 * e}}}}}\n' for e in (1, 2, 3)))
        if state in ("partial", "stopped"):
            (t.run_dir / ("last.pt" if state == "partial" else "stopped.json")).write_text("{}")
            continue
        recall, ndcg, with_test = state
        results = {"best_epoch": 3 + t.seed, "epochs_run": 3, "valid": {"recall@20": recall, "ndcg@10": ndcg},
                   "test": {}, "train_seconds": 1.0, "selected_by": "valid", "run_dir": str(t.run_dir)}
        if with_test:
            results["test"] = {"recall@20": recall / 2, "ndcg@10": ndcg / 2}
        (t.run_dir / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture
def fabricate_sweep():
    """``fabricate_sweep(out, valid)`` -> ``out`` (see ``_fabricate_sweep``)."""
    return _fabricate_sweep

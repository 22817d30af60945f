"""Every built-in model gets what the library gives every model: msi-train (a run directory with checkpoints and
results), --resume that extends a finished run, msi-eval of its best.pt agreeing with results.json, msi-recommend
leaving out train items, and open_run giving back the trained weights. A model registered in msi.models is picked
up here without a line of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msi import registry
from msi.cli import eval_main, recommend_main, train_main
from msi.runtime import open_run
from tests.conftest import recommended_train_pairs

BUILTINS = sorted(n for n in registry.names() if registry.get(n).build.__module__.startswith("msi.models."))


def test_the_built_in_models_are_found():
    assert {"msi", "lightgcn", "bpr", "vbpr", "popularity"} <= set(BUILTINS)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("every-model")


@pytest.fixture(scope="module", params=BUILTINS)
def run_dir(request, work) -> Path:
    name = request.param
    (work / f"{name}.yaml").write_text(
        f"data:\n  root: data\n  name: tiny\n  synth_preset: tiny\nmodel:\n  name: {name}\n"
        f"train:\n  epochs: 2\n  batch_size: 128\n  device: cpu\n  out_dir: runs\n  run_name: {name}\n"
    )
    assert train_main(["--config", str(work / f"{name}.yaml"), "--quiet"]) == 0
    return work / "runs" / name


def _trains(run_dir: Path) -> bool:
    """Whether the run's model has trainable parameters; one without (popularity) is scored once, as epoch 0."""
    return bool(list(open_run(run_dir / "best.pt", torch.device("cpu")).model.parameters()))


def test_train_writes_a_finished_run(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if _trains(run_dir):
        assert [r["epoch"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
    else:
        assert [r["epoch"] for r in rows] == [0] and results["epochs_run"] == 0
    assert 0 <= results["valid"]["recall@20"] <= 1 and 0 <= results["test"]["recall@20"] <= 1
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()


def test_resume_extends_the_finished_run(run_dir, capsys):
    assert train_main(["--resume", str(run_dir), "train.epochs=3", "--quiet"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == ([1, 2, 3] if _trains(run_dir) else [0])
    assert json.loads((run_dir / "results.json").read_text())["valid"]["recall@20"] >= 0


def test_eval_of_best_agrees_with_results(run_dir, capsys):
    assert eval_main(["--checkpoint", str(run_dir / "best.pt"), "--device", "cpu", "--split", "valid"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((run_dir / "results.json").read_text())
    assert metrics["recall@20"] == pytest.approx(results["valid"]["recall@20"], abs=1e-6)


def test_recommend_leaves_out_train_items(run_dir, work, capsys):
    out = run_dir.parent / f"{run_dir.name}-recs.tsv"
    assert recommend_main(["--checkpoint", str(run_dir / "best.pt"), "--device", "cpu", "--k", "5",
                           "--out", str(out)]) == 0
    capsys.readouterr()
    rows, seen = recommended_train_pairs(out, work / "data" / "tiny" / "tiny.inter")
    assert rows and not seen


def test_open_run_gives_back_the_saved_weights(run_dir):
    model, cfg, _, ckpt = open_run(run_dir / "best.pt", torch.device("cpu"))
    assert cfg.model.name == run_dir.name and not model.training
    state = model.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)

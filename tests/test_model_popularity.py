"""The popularity model through the library's tools: msi-train scores it as epoch 0 (no parameters, no epoch), a
resume (with more epochs too) only finishes it again, and msi-eval, msi-recommend and msi-compare open its runs like
any other."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msi.cli import compare_main, eval_main, recommend_main, train_main
from msi.models import Popularity
from msi.rundir import read_metrics
from msi.runtime import open_run
from msi.train import resume

SEEDS = (1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[Path]]:
    """Popularity and LightGCN (2 epochs), seeds 1 and 2, on generated tiny data."""
    d = tmp_path_factory.mktemp("popularity")
    (d / "tiny.yaml").write_text("data:\n  root: data\n  name: tiny\n  synth_preset: tiny\n"
                                 "train:\n  epochs: 2\n  device: cpu\n  out_dir: runs\neval:\n  ks: [5, 20]\n")
    out: dict[str, list[Path]] = {}
    for model in ("popularity", "lightgcn"):
        for seed in SEEDS:
            argv = ["--config", str(d / "tiny.yaml"), "--quiet", f"model.name={model}", f"train.seed={seed}",
                    f"train.run_name={model}-{seed}"]
            assert train_main(argv) == 0
            out.setdefault(model, []).append(d / "runs" / f"{model}-{seed}")
    return out


def test_train_scores_it_as_epoch_zero(runs):
    run = runs["popularity"][0]
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "results.json", "train.log"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 0 and results["epochs_run"] == 0
    rows = read_metrics(run)
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["valid"] == results["valid"]
    assert "no trainable parameters" in (run / "train.log").read_text()
    model, _, data, _ = open_run(run / "best.pt")
    counts = np.bincount(data.train[:, 1], minlength=data.n_items)
    assert isinstance(model, Popularity) and not list(model.parameters())
    torch.testing.assert_close(model.score(torch.tensor([0]))[0], torch.from_numpy(counts).float())
    assert json.loads((runs["popularity"][1] / "results.json").read_text())["test"] == results["test"]


def test_resume_of_a_finished_run_and_with_more_epochs(runs, tmp_path):
    run = runs["popularity"][0]
    before = json.loads((run / "results.json").read_text())
    assert resume(run, quiet=True) == before
    again = resume(run, ["train.epochs=5"], quiet=True)
    assert again["test"] == before["test"] and again["epochs_run"] == 0
    assert [r["epoch"] for r in read_metrics(run)] == [0]  # finished again, not scored twice


def test_eval_prints_the_runs_test_metrics(runs, capsys):
    run = runs["popularity"][0]
    assert eval_main(["--checkpoint", str(run / "best.pt"), "--device", "cpu", "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in ("recall@20", "ndcg@5")} == {
        k: json.loads((run / "results.json").read_text())["test"][k] for k in ("recall@20", "ndcg@5")}


def test_recommend_ranks_unseen_items_by_train_count(runs, tmp_path):
    run, out = runs["popularity"][0], tmp_path / "rec.tsv"
    assert recommend_main(["--checkpoint", str(run / "best.pt"), "--device", "cpu", "--k", "5",
                           "--out", str(out)]) == 0
    _, _, data, _ = open_run(run / "best.pt")
    counts = np.bincount(data.train[:, 1], minlength=data.n_items)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    seen = {(int(u), int(i)) for u, i in data.train}
    for user in range(data.n_users):
        mine = [r for r in rows if int(r["userID"]) == user]
        items = [int(r["itemID"]) for r in mine]
        assert len(items) == 5 and not any((user, i) in seen for i in items)
        assert [float(r["score"]) for r in mine] == [float(counts[i]) for i in items]
        unseen_rest = [counts[i] for i in range(data.n_items) if (user, i) not in seen and i not in items]
        assert min(counts[items]) >= max(unseen_rest)


def test_compare_pairs_popularity_with_another_model(runs, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    argv = ["--a", *map(str, runs["popularity"]), "--b", *map(str, runs["lightgcn"]), "--device", "cpu", "--quiet",
            "--json", str(js)]
    assert compare_main(argv) == 0
    got = json.loads(js.read_text())
    assert got["n_seeds"] == 2 and got["a_mean"] == pytest.approx(
        json.loads((runs["popularity"][0] / "results.json").read_text())["valid"]["recall@20"], abs=1e-12)

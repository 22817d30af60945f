"""scripts/sweep_fallback.py (msi-sweep's trials without Ray) and scripts/probe.py (the modality probe of a sweep),
end to end on the tiny generated set, on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from msi.select import report
from msi.sweepdir import trial_state
from tests.conftest import load_script as load


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 2-point x 2-seed sweep run by the fallback on tiny data, 2 epochs each."""
    tmp = tmp_path_factory.mktemp("fallback")
    config = tmp / "tiny.yaml"
    config.write_text(f"data: {{root: {tmp / 'data'}, name: tiny, synth_preset: tiny}}\n"
                      "model: {embedding_dim: 16}\ntrain: {epochs: 2, device: cpu}\n")
    out = tmp / "sweep"
    args = ["--config", str(config), "--grid", "loss.alpha=0.1,0.01", "--seeds", "1", "2",
            "--set", "train.patience=5", "--out", str(out), "--max-concurrent", "2"]
    assert load("sweep_fallback").main(args) == 0
    return out


def test_fallback_writes_an_ordinary_msi_sweep_folder(sweep):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.startswith("tiny_"))
    assert [p.name for p in runs] == ["tiny_loss.alpha-0.01_s1", "tiny_loss.alpha-0.01_s2",
                                      "tiny_loss.alpha-0.1_s1", "tiny_loss.alpha-0.1_s2"]
    assert all(trial_state(p) == "done" for p in runs)
    for p in runs:  # each trial's log: its epoch lines (from the run's train.log), then msi-train's result line
        log = (sweep / "logs" / f"{p.name}.log").read_text()
        assert " epoch 1: loss=" in log and " epoch 2: loss=" in log and log.splitlines()[-1].startswith(f"{p}: best epoch ")
    summary = report(sweep)  # msi-sweep --report reads it as its own
    selected = summary["configs"]["tiny"]["selected"]
    assert len(selected["run_dirs"]) == 2 and selected["test"]["recall@20"]["n"] == 2
    assert "(selected)" in (sweep / "results.md").read_text()


def test_fallback_rerun_trains_nothing_more(sweep, capsys):
    before = {p: p.stat().st_mtime for p in sweep.glob("tiny_*/results.json")}
    args = ["--config", str(sweep.parent / "tiny.yaml"), "--grid", "loss.alpha=0.1,0.01", "--seeds", "1", "2",
            "--set", "train.patience=5", "--out", str(sweep)]
    assert load("sweep_fallback").main(args) == 0
    assert {p: p.stat().st_mtime for p in sweep.glob("tiny_*/results.json")} == before


def test_probe_scores_every_view_of_the_selected_runs(sweep, capsys):
    assert load("probe").main([str(sweep), "--probe", "tiny", "--device", "cpu"]) == 0
    text = (sweep / "probe.md").read_text()
    for view in ("| id |", "| image |", "| text |"):
        assert view in text
    selected = json.loads((sweep / "summary.json").read_text())["configs"]["tiny"]["selected"]["point"]
    assert " ".join(selected) in text


def test_fallback_reruns_a_trial_whose_results_json_is_damaged(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    damaged = copy / "tiny_loss.alpha-0.1_s1" / "results.json"
    good = json.loads(damaged.read_text())
    damaged.write_text(damaged.read_text()[:40])  # cut short, as a full disk or a copy interrupted leaves it
    others = {p: p.read_bytes() for p in copy.glob("tiny_*/results.json") if p != damaged}
    args = ["--config", str(sweep.parent / "tiny.yaml"), "--grid", "loss.alpha=0.1,0.01", "--seeds", "1", "2",
            "--set", "train.patience=5", "--out", str(copy)]
    assert load("sweep_fallback").main(args) == 0
    assert "tiny_loss.alpha-0.1_s1: done" in capsys.readouterr().out
    assert json.loads(damaged.read_text())["valid"] == good["valid"]  # scored again from its best.pt
    assert {p: p.read_bytes() for p in others} == others


@pytest.mark.parametrize("extra, says", [
    (["--grid", "loss.alpha=0.1,0.1"], "--grid 'loss.alpha=0.1,0.1': loss.alpha=0.1 is given twice"),
    (["--deadline", "0"], "--deadline 0: must be"), (["--max-concurrent", "0"], "--max-concurrent 0: must be"),
    (["--set", "data.name=tinx"], "tinx.inter does not exist"),
])
def test_fallback_refuses_what_msi_sweep_refuses_before_writing(sweep, tmp_path, capsys, extra, says):
    args = ["--config", str(sweep.parent / "tiny.yaml"), "--seeds", "1", "--out", str(tmp_path / "s"), *extra]
    assert load("sweep_fallback").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err and not (tmp_path / "s").exists()


def test_fallback_ctrl_c_says_the_command_that_continues_it(sweep, tmp_path, capsys, monkeypatch):
    fallback = load("sweep_fallback")

    def ctrl_c(run_dir):
        raise KeyboardInterrupt
    monkeypatch.setattr(fallback, "prepare_trial_dir", ctrl_c)
    args = ["--config", str(sweep.parent / "tiny.yaml"), "--seeds", "1", "--out", str(tmp_path / "s")]
    assert fallback.main(args) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: interrupted; ")
    assert err.strip().endswith(f"continue with python3 {fallback.__file__} {' '.join(args)}")
    assert (tmp_path / "s" / "sweep.yaml").is_file() and not (tmp_path / "s" / ".lock").exists()


def test_table2_top_prints_the_eligible_points_best_on_valid(fabricate_sweep, tmp_path, capsys):
    a, b = ("loss.alpha=0.1", "eval.ks=[10,20]"), ("loss.alpha=0.1", "eval.ks=[10,20,50]")
    c, d = ("loss.alpha=0.01", "eval.ks=[10,20]"), ("loss.alpha=0.01", "eval.ks=[10,20,50]")
    valid = {"recall": {a: [(0.30, 0.9, True), (0.32, 0.9, True)], b: [(0.50, 0.1, True), (0.52, 0.1, True)],
                        c: [(0.90, 0.9, False), "partial"], d: [(0.20, 0.9, True), (0.20, 0.9, True)]}}
    out = fabricate_sweep(tmp_path / "screen", valid)
    top = load("table2_top")
    assert top.main([str(out)]) == 2 and "no summary.json" in capsys.readouterr().err  # not reported yet
    report(out)  # its popularity floor generates the tiny data set and says so
    capsys.readouterr()
    assert top.top_points(out, 2) == [list(b), list(a)]  # c scores higher but misses a seed
    assert top.top_points(out, 9, "recall") == [list(b), list(a), list(d)]
    assert top.main([str(out), "1"]) == 0 and capsys.readouterr().out == "loss.alpha=0.1 eval.ks=[10,20,50]\n"
    assert top.main([str(out), "1", "other"]) == 2 and "no config 'other'" in capsys.readouterr().err


def test_table2_split_scores_the_selected_runs_on_warm_and_cold_items(sweep, tmp_path, capsys):
    split = load("table2_split")
    assert split.main([str(tmp_path)]) == 2 and "no summary.json" in capsys.readouterr().err
    summary = report(sweep)
    selected = summary["configs"]["tiny"]["selected"]
    out = tmp_path / "split.md"
    assert split.main([str(sweep), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    # the tiny set's test items all have train rows: its warm rows are all its rows, so the warm figures are the
    # selected runs' own test figures (results.json, scored by the trainer), and there is nothing cold to score
    test = selected["test"]
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    cells = row.split(" | ")
    assert cells[1] == "2"
    for cell, metric in zip(cells[2:6], split.METRICS):
        assert cell.rstrip(" |") == f"{test[metric]['mean']:.4f} ± {test[metric]['std']:.4f}"
    assert "Test rows of cold items (without a train row): 0: nothing to score." in text
    out.write_text("my notes\n")
    assert split.main([str(sweep), "--out", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "my notes\n"


def test_table2_split_counts_test_rows_of_warm_and_cold_items():
    from types import SimpleNamespace

    import numpy as np

    data = SimpleNamespace(train=np.array([[0, 0], [1, 1], [1, 0]]), test=np.array([[0, 1], [0, 2], [1, 3], [2, 0]]))
    assert load("table2_split").test_rows(data) == {"warm": 2, "cold": 2}  # items 2 and 3 have no train row

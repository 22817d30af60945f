"""msi/select.py: valid-only selection on fabricated run directories, list-valued grids, the sweep record, tables."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import GRID

from msi.errors import MSIError
from msi.cli import sweep_main
from msi.select import load_sweep, report, summarize, union_report, union_trials
from msi.sweepdir import grid_points, record_sweep, run_name, split_values

A = ("loss.alpha=0.1", "eval.ks=[10,20]")
B = ("loss.alpha=0.1", "eval.ks=[10,20,50]")
C = ("loss.alpha=0.01", "eval.ks=[10,20]")
D = ("loss.alpha=0.01", "eval.ks=[10,20,50]")
# (recall@20, ndcg@10, test written); runs of points that must not be selected carry no test metrics
VALID = {
    "recall": {A: [(0.30, 0.9, False), (0.32, 0.9, False)], B: [(0.50, 0.1, True), (0.52, 0.1, True)],
               C: [(0.90, 0.9, False), "partial"], D: [(0.95, 0.9, False), "stopped"]},
    "ndcg": {A: [(0.90, 0.1, False), (0.90, 0.1, False)], B: [(0.10, 0.4, True), (0.10, 0.6, True)],
             C: ["partial", "partial"], D: [(0.10, 0.9, False), "stopped"]},
}


@pytest.fixture
def sweep(fabricate_sweep, tmp_path) -> Path:
    return fabricate_sweep(tmp_path / "sweep", VALID)


def select(out: Path) -> dict:
    _, trials, cfgs = load_sweep(out)
    return summarize(trials, {name: cfg.train.metric for name, cfg in cfgs.items()})


def test_best_mean_valid_wins_among_points_whose_seeds_all_finished(sweep):
    chosen = select(sweep)["recall"]
    assert chosen["selected"]["point"] == list(B)  # C and D score higher on valid but miss a seed
    assert chosen["selected"]["test"]["recall@20"]["mean"] == pytest.approx(0.255)
    assert chosen["selected"]["test"]["recall@20"]["std"] == pytest.approx(0.0070710678)
    assert chosen["selected"]["valid"]["recall@20"]["n"] == 2
    assert chosen["selected"]["best_epoch"] == [4, 5]
    grid = {tuple(g["point"]): g for g in chosen["grid"]}
    assert [grid[p]["eligible"] for p in (A, B, C, D)] == [True, True, False, False]
    assert grid[C]["finished"] == 1 and grid[D]["stopped"] == 1
    assert grid[A]["valid"]["mean"] == pytest.approx(0.31)


def test_train_metric_other_than_recall_is_honoured(sweep):
    chosen = select(sweep)["ndcg"]
    assert chosen["metric"] == "ndcg@10"
    assert chosen["selected"]["point"] == list(B)  # A wins on recall@20
    assert chosen["selected"]["valid"]["ndcg@10"]["mean"] == pytest.approx(0.5)


def test_no_eligible_point_selects_nothing(fabricate_sweep, tmp_path):
    out = fabricate_sweep(tmp_path / "s", {"recall": {p: ["partial", (0.5, 0.5, False)] for p in (A, B, C, D)}})
    assert select(out)["recall"]["selected"] is None


def test_report_writes_the_tables_and_the_popularity_floor(sweep):
    summary = report(sweep)
    assert json.loads((sweep / "summary.json").read_text()) == summary
    assert summary["configs"] == select(sweep)
    assert set(summary["popularity"]) == {"tiny"}
    md = (sweep / "results.md").read_text()
    assert "| recall | loss.alpha=0.1 eval.ks=[10,20,50] | 2 | 0.2550 ± 0.0071 |" in md
    assert "| loss.alpha=0.1 eval.ks=[10,20,50] (selected) | 0.5100 ± 0.0141 | 2 | yes |" in md
    assert "popularity, tiny" in md
    rows = list(csv.DictReader(io.StringIO((sweep / "results.csv").read_text())))
    test_rows = [r for r in rows if r["split"] == "test" and r["role"] == "selected"]
    assert {(r["config"], r["point"]) for r in test_rows} == {("recall", " ".join(B)), ("ndcg", " ".join(B))}


def test_mmrec_rule_reports_the_point_best_on_test_beside_the_one_chosen_on_valid(fabricate_sweep, tmp_path):
    # A is below B on valid (0.31 against 0.51) but above it on test (0.40 against 0.255): valid selects B, the
    # point best on test is A; C and D miss a seed and are eligible for neither
    valid = {"recall": {A: [(0.30, 0.9, True), (0.32, 0.9, True)], **{p: VALID["recall"][p] for p in (B, C, D)}}}
    out = fabricate_sweep(tmp_path / "s", valid)
    for run in [t.run_dir for t in load_sweep(out)[1] if t.point == A]:
        results = json.loads((run / "results.json").read_text())
        results["test"]["recall@20"] = 0.40
        (run / "results.json").write_text(json.dumps(results))
    assert "chosen_on_test" not in report(out)  # read only when asked for
    summary = report(out, by_test=True)
    assert summary["configs"]["recall"]["selected"]["point"] == list(B)  # the selection is valid's, unchanged
    assert summary["chosen_on_test"]["recall"]["point"] == list(A)
    assert summary["chosen_on_test"]["recall"]["test"]["mean"] == pytest.approx(0.40)
    md = (out / "results.md").read_text()
    assert "| chosen on test (MMRec's rule) |" in md
    assert "| 2 | 0.2550 ± 0.0071 |" in md and "recall@20 0.4000 ± 0.0000 at loss.alpha=0.1 eval.ks=[10,20] |" in md


def test_the_table_adds_a_column_for_a_selection_metric_beyond_recall_and_ndcg():
    from msi.select import render_markdown

    one = lambda v: {"mean": v, "std": None, "n": 1}  # noqa: E731
    test = {"recall@20": one(0.4), "ndcg@20": one(0.3), "map@20": one(0.2), "hit@20": one(0.9), "mrr@20": one(0.5)}
    selected = {"point": [], "run_dirs": ["r"], "valid": {"mrr@20": one(0.6)}, "test": test, "best_epoch": [3]}
    summary = {"seeds": [1], "popularity": {}, "configs": {"m": {"metric": "mrr@20", "selected": selected, "grid": []}}}
    header, _, row = render_markdown(summary).splitlines()[2:5]
    assert header == ("| config | selected point | n | test recall@20 | test ndcg@20 | test mrr@20 | valid (selection "
                      "metric) | best epochs |")
    assert row == "| m | (the config as written) | 1 | 0.4000 | 0.3000 | 0.5000 | mrr@20 0.6000 | 3 |"


def test_grid_values_may_hold_commas_inside_brackets():
    assert split_values("[10,20],[5,10], 3") == ["[10,20]", "[5,10]", "3"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    assert grid_points(["eval.ks=[10,20],[5]", "loss.alpha=0.1"]) == [
        ("eval.ks=[10,20]", "loss.alpha=0.1"), ("eval.ks=[5]", "loss.alpha=0.1")]
    assert grid_points([]) == [()]
    name = run_name(Path("c/tiktok.yaml"), ("eval.ks=[10,20]", "loss.alpha=0.1"), 7)
    assert name == "tiktok_eval.ks-10+20_loss.alpha-0.1_s7"


@pytest.mark.parametrize("bad", ["loss.alpha", "alpha=1,2", "loss.alpha=1,,2"])
def test_malformed_grid_item_is_an_error_that_names_it(bad):
    with pytest.raises(MSIError, match="--grid"):
        grid_points([bad])


def test_another_sweep_in_the_same_folder_is_refused(sweep):
    configs = [sweep.parent / "recall.yaml", sweep.parent / "ndcg.yaml"]
    record_sweep(sweep, configs, GRID, [1, 2], [])  # the same sweep again: accepted
    with pytest.raises(MSIError, match="sweep.yaml: this folder holds another sweep \\(its grid differ\\)"):
        record_sweep(sweep, configs, ["loss.alpha=1"], [1, 2], [])


# A grid run in parts: dropout 0.5 on one machine (X), dropout 0.3 on another (Y), and X's unfinished trials
# finished later in a folder of their own (Z, another data.root: where it ran, not what it trained)
X = {A: [(0.30, 0, False), (0.32, 0, False)], B: [(0.50, 0, False), (0.52, 0, False)],
     C: [(0.90, 0, True), "partial"], D: ["partial", "partial"]}
Y = {A: [(0.60, 0, True), (0.62, 0, True)], B: [(0.10, 0, False)] * 2, C: [(0.10, 0, False)] * 2,
     D: [(0.10, 0, False)] * 2}
Z = {A: ["partial"] * 2, B: ["partial"] * 2, C: ["partial", (0.80, 0, True)], D: ["partial"] * 2}
DROP5 = ("data.root=/gpu/data", "train.checkpoint_every=5", "model.dropout=0.5")


def test_union_selects_over_the_points_of_every_folder(fabricate_sweep, tmp_path, capsys):
    x = fabricate_sweep(tmp_path / "x", {"recall": X}, overrides=DROP5)
    y = fabricate_sweep(tmp_path / "y", {"recall": Y}, overrides=("model.dropout=0.3",))
    summary = union_report([x, y], tmp_path / "xy")
    chosen = summary["configs"]["recall"]["selected"]
    assert chosen["point"] == ["eval.ks=[10,20]", "loss.alpha=0.1", "model.dropout=0.3"]  # sorted, run keys left out
    assert chosen["test"]["recall@20"]["mean"] == pytest.approx(0.305)
    assert len(summary["configs"]["recall"]["grid"]) == 8
    # the same through the command line, which prints the union's table
    assert sweep_main(["--report", str(x), str(y), "--out", str(tmp_path / "xy2")]) == 0
    assert "loss.alpha=0.1 model.dropout=0.3 (selected)" in capsys.readouterr().out


def test_union_of_sweeps_differing_only_in_where_they_ran_has_the_points_of_one(fabricate_sweep, tmp_path):
    """train.device (a key of msi.config.NOT_A_SETTING, the one list msi-plot groups runs by too) is not a setting."""
    x = fabricate_sweep(tmp_path / "x", {"recall": X}, overrides=("train.device=cpu",))
    y = fabricate_sweep(tmp_path / "y", {"recall": Z}, overrides=("train.device=cuda",))
    trials, _, _ = union_trials([x, y])
    assert len({t.point for t in trials}) == 4


def test_union_names_the_point_of_a_folder_run_without_a_grid(fabricate_sweep, tmp_path):
    plain = fabricate_sweep(tmp_path / "plain", {"recall": {(): [(0.70, 0, True), (0.72, 0, True)]}}, grid=[])
    y = fabricate_sweep(tmp_path / "y", {"recall": Y}, overrides=("model.dropout=0.3",))
    summary = union_report([plain, y], tmp_path / "u")
    assert summary["configs"]["recall"]["selected"]["point"] == []
    md = (tmp_path / "u" / "results.md").read_text()
    assert "| recall | (the config as written) | 2 |" in md
    assert "| (the config as written) (selected) | 0.7100 ± 0.0141 | 2 | yes |" in md


def test_union_counts_a_trial_finished_in_another_folder_once(fabricate_sweep, tmp_path):
    x = fabricate_sweep(tmp_path / "x", {"recall": X}, overrides=DROP5)
    z = fabricate_sweep(tmp_path / "z", {"recall": Z}, overrides=("data.root=/cpu/data", "model.dropout=0.5"))
    summary = union_report([x, z], tmp_path / "xz")
    chosen = summary["configs"]["recall"]["selected"]
    assert chosen["point"] == ["eval.ks=[10,20]", "loss.alpha=0.01"]  # C, seed 1 from x and seed 2 from z
    assert chosen["valid"]["recall@20"]["values"] == [0.90, 0.80]
    assert {Path(r).parent.name for r in chosen["run_dirs"]} == {"x", "z"}


def test_union_refuses_twice_finished_trials_and_other_seeds(fabricate_sweep, tmp_path):
    x = fabricate_sweep(tmp_path / "x", {"recall": X}, overrides=DROP5)
    twice = fabricate_sweep(tmp_path / "t", {"recall": {**X, A: [(0.31, 0, False), (0.32, 0, False)]}},
                            overrides=DROP5)  # A finished again, with another result
    with pytest.raises(MSIError, match="the same trial finished twice"):
        union_report([x, twice], tmp_path / "u")
    copied = tmp_path / "c"
    shutil.copytree(x, copied)  # the same run directories, copied: counted once
    trials, _, _ = union_trials([x, copied])
    assert len(trials) == 8 and {t.run_dir.parent for t in trials} == {x}
    seeds = fabricate_sweep(tmp_path / "s", {"recall": Y}, seeds=(1, 3), overrides=("model.dropout=0.3",))
    with pytest.raises(MSIError, match="seeds \\[1, 3\\] differ"):
        union_report([x, seeds], tmp_path / "u2")
    with pytest.raises(MSIError, match="holds a sweep"):
        union_report([x, seeds], x)


# ---------------------------------------------------------------- damaged files: unfinished, named, no traceback


@pytest.mark.parametrize("damage, why", [
    (lambda r: json.dumps(r)[:30], "not JSON"),
    (lambda r: json.dumps({**r, "valid": {**r["valid"], "recall@20": float("nan")}}), "valid recall@20 is nan"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "best_epoch"}), "missing best_epoch"),
])
def test_a_damaged_results_json_counts_as_unfinished_and_the_report_names_it(sweep, capsys, damage, why):
    from msi.sweepdir import trial_state

    _, trials, _ = load_sweep(sweep)
    hit = next(t for t in trials if t.config.stem == "recall" and t.point == A and t.seed == 1)
    path = hit.run_dir / "results.json"
    path.write_text(damage(json.loads(path.read_text())))
    assert trial_state(hit.run_dir) == "new"  # no last.pt: the sweep starts it again
    (hit.run_dir / "last.pt").write_text("{}")
    assert trial_state(hit.run_dir) == "resumable"  # the trainer scores it again
    assert sweep_main(["--report", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and f"- {path}: damaged, {why}" in out and "counted as unfinished" in out
    grid = {tuple(g["point"]): g for g in select(sweep)["recall"]["grid"]}
    assert grid[A]["finished"] == 1 and not grid[A]["eligible"]  # A lost a seed until it is run again


def test_a_results_json_without_the_selection_metric_is_one_line_naming_it(sweep):
    _, trials, _ = load_sweep(sweep)
    hit = next(t for t in trials if t.config.stem == "recall" and t.point == A and t.seed == 1)
    results = json.loads((hit.run_dir / "results.json").read_text())
    (hit.run_dir / "results.json").write_text(json.dumps({**results, "valid": {"ndcg@10": 0.1}}))
    with pytest.raises(MSIError, match=re.escape(f"{hit.run_dir / 'results.json'}: valid has no recall@20 (it has "
                                                  "ndcg@10)")):
        select(sweep)


# ---------------------------------------------------------------- one row per config and data set (issue 19, 6)


def other_data_set(sweep: Path, name: str) -> None:
    """A copy of the tiny data set under another name beside ``sweep``'s configs (their data.root)."""
    from msi.config import load_config
    from msi.runtime import dataset_for

    dataset_for(load_config(sweep.parent / "recall.yaml"), progress=False)  # generates data/tiny
    root = sweep.parent / "data"
    shutil.copytree(root / "tiny", root / name)
    (root / name / "tiny.inter").rename(root / name / f"{name}.inter")


def test_folders_of_different_data_sets_are_selected_apart(fabricate_sweep, tmp_path, capsys):
    x = fabricate_sweep(tmp_path / "x", {"recall": VALID["recall"]})  # data set tiny
    y = fabricate_sweep(tmp_path / "y", {"recall": Y}, overrides=("data.name=tiny2",))
    other_data_set(x, "tiny2")
    summary = union_report([x, y], tmp_path / "xy")
    assert set(summary["configs"]) == {"recall@tiny", "recall@tiny2"}
    assert set(summary["popularity"]) == {"tiny", "tiny2"}
    on_x, on_y = summary["configs"]["recall@tiny"], summary["configs"]["recall@tiny2"]
    assert on_x["selected"]["point"] == sorted(B) and len(on_x["grid"]) == 4  # X's own best, not Y's A at 0.61
    assert on_y["selected"]["point"] == ["data.name=tiny2", *sorted(A)]
    assert {Path(d).parent for d in on_y["selected"]["run_dirs"]} == {y}
    assert sweep_main(["--report", str(x), str(y), "--out", str(tmp_path / "xy2")]) == 0
    out = capsys.readouterr().out
    assert "| recall@tiny | eval.ks=[10,20,50] loss.alpha=0.1 | 2 |" in out and "popularity, tiny2" in out
    # msi-compare's SWEEP_DIR:CONFIG names a row the same way in a sweep whose grid spans data sets
    from msi.compare import selected_run_dirs

    assert selected_run_dirs(y, "recall") == [Path(d) for d in on_y["selected"]["run_dirs"]]


def test_split_rows_names_a_row_per_data_set_only_where_a_config_spans_several():
    from msi.select import split_rows
    from msi.sweepdir import Trial

    trials = [Trial(Path(f"{c}.yaml"), (), s, Path(f"/s/{c}_{d}_s{s}"), c) for c in ("a", "b") for d in ("u", "v")
              for s in (1, 2) if c == "a" or d == "u"]
    data = {t.run_dir: t.run_dir.name.split("_")[1] for t in trials}
    assert [t.row for t in split_rows(trials, data)] == ["a@u", "a@u", "a@v", "a@v", "b", "b"]


# ---------------------------------------------------------------- planning refuses what would train twice or collide


def test_values_that_make_one_run_directory_are_refused(tmp_path):
    from msi.sweepdir import plan_trials

    with pytest.raises(MSIError, match="both make the run directory tiny_model.name-msi_s1"):
        plan_trials([tmp_path / "tiny.yaml"], ["model.name=msi,m si"], [1], tmp_path / "s")
    ks = f"[{','.join(map(str, range(1, 100)))}]"
    with pytest.raises(MSIError, match="bytes long, more than a file name may be \\(255\\)"):
        plan_trials([tmp_path / "tiny.yaml"], [f"eval.ks={ks}"], [1], tmp_path / "s")


def test_a_trial_directory_in_use_is_never_cleared(tmp_path):
    from msi.rundir import locked
    from msi.sweepdir import prepare_trial_dir

    run_dir = tmp_path / "tiny_s1"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")  # a partial start: cleared when nobody holds it
    with locked(run_dir):
        with pytest.raises(MSIError, match=re.escape(f"{run_dir}: in use by a live process (pid {os.getpid()})")):
            prepare_trial_dir(run_dir)
        assert (run_dir / "metrics.jsonl").is_file()
    assert prepare_trial_dir(run_dir) is False and not run_dir.exists()
    run_dir.write_text("mine")  # a file where the trial's directory belongs is not removed either
    with pytest.raises(MSIError, match="a file where this trial's run directory belongs"):
        prepare_trial_dir(run_dir)
    assert run_dir.read_text() == "mine"


def test_one_folder_reported_to_out_leaves_the_sweep_folder_as_it_was(sweep, tmp_path, capsys):
    assert sweep_main(["--report", str(sweep), "--out", str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / "results.md").is_file() and not (sweep / "results.md").exists()

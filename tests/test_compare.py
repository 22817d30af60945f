"""msi/compare.py: the paired statistics on hand-made per-user arrays; pairing, data checks, a sweep's selected
points and ``msi-sweep --report --baseline`` on tiny trained runs; ``msi-compare`` end to end."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml

from msi.cli import compare_main, msi_main, sweep_main
from msi.compare import (JSON_KEYS, bootstrap_ci, compare, paired_stats, read_runs, render_markdown,
                         setting_differences)
from msi.config import load_config
from msi.data.synth import generate
from msi.errors import DataError, MSIError
from msi.select import load_sweep, summarize
from msi.sweepdir import plan_trials, record_sweep, trial_config
from msi.train import train

SEEDS = [1, 2]
GRID = ["loss.gamma=0.1,0.01"]
BASE = {"data": {"name": "tiny"}, "model": {"embedding_dim": 16},
        "train": {"epochs": 2, "device": "cpu"}, "eval": {"ks": [5, 20]}}


def stats(a, b, seeds=None):
    return paired_stats(np.asarray(a), np.asarray(b), seeds or list(range(len(a))), "recall@20", "valid")


# ---- the statistics, on per-user arrays (seeds, users)

def test_identical_runs_give_delta_0_a_ci_holding_0_and_p_1_without_warnings():
    a = np.random.default_rng(0).random((3, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = stats(a, a.copy())
    assert c.delta == 0.0 and c.ci95 == (0.0, 0.0) and c.a_mean == c.b_mean
    assert c.p_wilcoxon == 1.0
    assert c.p_ttest_seeds is None and "equal" in c.ttest_note


def test_hits_removed_for_known_users_give_the_analytic_delta_and_a_ci_excluding_0():
    rng = np.random.default_rng(1)
    a = rng.choice([0.0, 0.5, 1.0], size=(3, 200))
    a[:, :40] = rng.choice([0.5, 1.0], size=(3, 40))  # every seed hits for the first 40 users
    b = a.copy()
    b[:, :40] = 0.0  # B: the same runs with the hits of users 0..39 removed
    c = stats(a, b)
    assert c.delta == pytest.approx(-a[:, :40].sum() / (3 * 200), abs=1e-15)
    assert c.b_mean - c.a_mean == pytest.approx(c.delta, abs=1e-15)
    assert c.ci95[0] < c.delta < c.ci95[1] < 0
    assert c.p_wilcoxon < 1e-6  # 40 users lose, none gains
    assert c.n_users == 200 and c.seeds == [0, 1, 2]
    assert c.b_seeds == pytest.approx(b.mean(1).tolist())


def test_bootstrap_is_seeded_and_percentile_based():
    diff = np.random.default_rng(2).normal(0.1, 1.0, size=300)
    lo, hi = bootstrap_ci(diff)
    assert (lo, hi) == bootstrap_ci(diff)  # the fixed seed: the same interval every time
    assert lo < diff.mean() < hi
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))  # the normal interval, which the percentiles approach
    assert (lo, hi) == pytest.approx((diff.mean() - half, diff.mean() + half), abs=0.02)
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)


def test_paired_t_test_over_seeds_and_when_it_is_undefined():
    a = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]])
    b = a + np.array([[0.05], [0.04], [0.06]])  # per-seed differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01
    t = 0.05 / (0.01 / math.sqrt(3))
    assert stats(a, b).p_ttest_seeds == pytest.approx(2 * scipy.stats.t.sf(t, df=2), rel=1e-9)
    one = stats(a[:1], b[:1])
    assert one.p_ttest_seeds is None and "one seed" in one.ttest_note
    assert one.to_json()["p_ttest_seeds"] is None


def test_shapes_must_agree():
    with pytest.raises(MSIError, match="expected two equal"):
        stats(np.zeros((2, 3)), np.zeros((2, 4)))


# ---- runs: a sweep folder of tiny runs (two configs x two grid points x two seeds), and runs on other data

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    generate("tiny", root / "data" / "tiny", seed=0, progress=False)
    configs = []
    for name, model in (("msi", {}), ("lgcn", {"name": "lightgcn"})):
        body = {**BASE, "data": {"root": str(root / "data"), "name": "tiny"}, "model": {**BASE["model"], **model}}
        configs.append(root / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(body))
    out = root / "sweep"
    record_sweep(out, configs, GRID, SEEDS, [])
    for t in plan_trials(configs, GRID, SEEDS, out):
        train(trial_config(t, []), out=t.run_dir, quiet=True)
    return out


def point_dirs(sweep: Path, config: str, alpha: str) -> list[Path]:
    return sorted(sweep.glob(f"{config}_loss.gamma-{alpha}_s*"))


@pytest.fixture(scope="module")
def other_data_runs(sweep) -> list[Path]:
    """MSI runs with the sweep's seeds on another generated data set of the same shape."""
    root = sweep.parent
    generate("tiny", root / "data" / "other", seed=1, name="other", progress=False)
    dirs = []
    for s in SEEDS:
        cfg = load_config(None, [f"data.root={root / 'data'}", "data.name=other", "model.embedding_dim=16",
                                 "train.epochs=2", "train.device=cpu", "eval.ks=[5,20]", f"train.seed={s}"])
        train(cfg, out=root / f"other_s{s}", quiet=True)
        dirs.append(root / f"other_s{s}")
    return dirs


def test_runs_against_themselves_give_delta_0_and_each_seed_its_own_valid_metric(sweep):
    runs = point_dirs(sweep, "msi", "0.1")
    c = compare(runs, runs, device="cpu", progress=False)
    assert c.delta == 0.0 and c.ci95 == (0.0, 0.0) and c.p_wilcoxon == 1.0
    assert c.seeds == SEEDS and c.n_users == 60
    # the per-user metric averages to the evaluator's own: the runs' results.json
    results = [json.loads((d / "results.json").read_text())["valid"]["recall@20"] for d in runs]
    assert c.a_seeds == pytest.approx(results, abs=1e-12)


def test_items_warm_scores_the_warm_rows_and_says_so(sweep):
    runs = point_dirs(sweep, "msi", "0.1")
    c = compare(runs, point_dirs(sweep, "msi", "0.01"), device="cpu", progress=False)
    warm = compare(runs, point_dirs(sweep, "msi", "0.01"), device="cpu", progress=False, items="warm")
    assert (warm.delta, warm.n_users) == (c.delta, c.n_users)  # every valid item of the tiny set has a train row
    assert warm.to_json()["items"] == "warm" and c.to_json()["items"] == "all"
    assert render_markdown(warm).startswith("recall@20 on valid (warm items only): 60 users")
    with pytest.raises(DataError, match="no users to evaluate with cold items"):
        compare(runs, runs, device="cpu", progress=False, items="cold")


@pytest.mark.parametrize("metric", ["hit@5", "mrr@20"])
def test_hit_and_mrr_are_compared_like_the_other_metrics(sweep, metric):
    runs = point_dirs(sweep, "msi", "0.1")
    c = compare(runs, point_dirs(sweep, "msi", "0.01"), metric=metric, device="cpu", progress=False)
    assert c.metric == metric
    for seeds, side in ((c.a_seeds, runs), (c.b_seeds, point_dirs(sweep, "msi", "0.01"))):
        results = [json.loads((d / "results.json").read_text())["valid"][metric] for d in side]
        assert seeds == pytest.approx(results, abs=1e-12)


def test_mismatched_seeds_are_refused_with_one_line(sweep):
    a, b = point_dirs(sweep, "msi", "0.1"), point_dirs(sweep, "msi", "0.01")
    with pytest.raises(MSIError) as e:
        compare(a, b[:1], progress=False)
    assert "seeds differ" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MSIError, match="both have seed 1"):
        compare([a[0], a[0]], b, progress=False)


def test_other_data_is_refused_and_lightgcn_on_the_same_data_is_paired(sweep, other_data_runs):
    msi_runs = point_dirs(sweep, "msi", "0.1")
    with pytest.raises(MSIError) as e:
        compare(msi_runs, other_data_runs, progress=False)
    assert "different data" in str(e.value) and "\n" not in str(e.value)
    # LightGCN's fingerprint differs (no features) but its rows are MSI's: its users pair
    c = compare(msi_runs, point_dirs(sweep, "lgcn", "0.1"), metric="ndcg@5", split="test", progress=False)
    assert c.n_users == 60 and c.metric == "ndcg@5" and c.split == "test"


def test_sweep_dir_config_stands_for_the_selected_point(sweep):
    _, trials, cfgs = load_sweep(sweep)
    chosen = summarize(trials, {n: c.train.metric for n, c in cfgs.items()})
    for name in ("msi", "lgcn"):
        got = [str(h.run_dir) for h in read_runs([f"{sweep}:{name}"])]
        assert got == chosen[name]["selected"]["run_dirs"]
    with pytest.raises(MSIError, match="no config 'bm3'"):
        read_runs([f"{sweep}:bm3"])


def test_sweep_report_with_a_baseline_adds_each_config_against_it_on_test(sweep, capsys):
    assert sweep_main(["--report", str(sweep), "--baseline", "msi"]) == 0
    text = (sweep / "results.md").read_text()
    assert capsys.readouterr().out == text
    c = compare([f"{sweep}:msi"], [f"{sweep}:lgcn"], split="test", device="cpu", progress=False)
    row = next(line for line in text.splitlines() if line.startswith("| lgcn | 60 |"))
    assert f"| {c.a_mean:.4f} | {c.b_mean:.4f} | {c.delta:+.4f} | [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}] |" in row
    assert "against msi's, on test, recall@20" in text
    assert sweep_main(["--report", str(sweep), "--baseline", "bm3"]) == 2
    assert "--baseline 'bm3'" in capsys.readouterr().err


def test_the_settings_a_and_b_differ_in_are_named():
    base = load_config(overrides=["model.dropout=0.3"])
    assert setting_differences([base], [base]) == ()
    other = load_config(overrides=["model.dropout=0.5", "train.seed=7", "train.device=cpu"])  # seed, device: no
    assert setting_differences([base], [other]) == ("model.dropout: 0.3 -> 0.5",)
    two = load_config(overrides=["model.use_ssd=false", "loss.alpha=0.01"])
    assert setting_differences([base, other], [two]) == ("model.dropout: 0.3, 0.5 -> 0.3",
                                                          "model.use_ssd: true -> false", "loss.alpha: 0.1 -> 0.01")
    lightgcn = setting_differences([base], [load_config(overrides=["model.name=lightgcn"])])
    assert "model.name: msi -> lightgcn" in lightgcn and "model.tau: 0.2 -> -" in lightgcn  # a key of MSI only
    text = render_markdown(replace(stats([[0.5]], [[0.5]]), differ=lightgcn[:2]))
    assert ("B: B\nA and B differ in 2 settings, so the delta is not one setting's effect (A -> B):\n"
            f"- {lightgcn[0]}\n- {lightgcn[1]}\n\n| seed |") in text


def test_msi_compare_end_to_end(sweep, tmp_path, capsys):
    a, b = point_dirs(sweep, "msi", "0.1"), point_dirs(sweep, "msi", "0.01")
    out, js = tmp_path / "cmp.md", tmp_path / "cmp.json"
    argv = ["--a", *map(str, a), "--b", *map(str, b), "--out", str(out), "--json", str(js), "--device", "cpu"]
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() + f"wrote {out}\nwrote {js}\n"  # as the other tools say what they wrote
    assert "recall@20 on valid: 60 users, 2 seeds" in printed
    assert "\nSetting that differs (A -> B): loss.gamma: 0.1 -> 0.01\n" in printed
    got = json.loads(js.read_text())
    assert list(got) == list(JSON_KEYS)
    assert got["n_users"] == 60 and got["n_seeds"] == 2 and got["split"] == "valid"
    assert len(got["ci95"]) == 2 and got["delta"] == pytest.approx(got["b_mean"] - got["a_mean"], abs=1e-12)
    assert msi_main(["compare", "--a", str(a[0]), "--b", *map(str, b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the seeds differ") and err.count("\n") == 1

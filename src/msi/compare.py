"""Paired comparison of two sets of runs on one data set (``msi-compare``), and a sweep's configs against a baseline.

Runs pair by seed (``train.seed`` of each run's config). Each run's best.pt is opened with ``open_run`` and scored
per user by the one evaluator (``Evaluator.per_user``). With a (S, U) and b (S, U), the per-user metric of S seeds
and the U users of the split, rows in seed order, and x̄_u = mean_s x[s, u]:
    per seed       mean_u x[s, u]                  (the run's own metric)
    delta          mean_u (b̄_u - ā_u)              (= b_mean - a_mean)
    ci95           2.5 and 97.5 percentiles of delta over 10,000 resamples of the users with replacement (fixed seed)
    p_wilcoxon     Wilcoxon signed-rank test over users of b̄_u - ā_u (1.0 when every difference is zero)
    p_ttest_seeds  paired t-test over seeds of the per-seed metrics (None with one seed, or when the per-seed
                   differences do not vary and t is undefined)
The statistics (``paired_stats``) take arrays; reading and scoring runs (``read_runs``, ``score_runs``) is apart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

from msi.checkpoint import load_checkpoint
from msi.config import MAX_INT, METRICS, Config, config_from_dict, settings
from msi.console import progress_bar
from msi.data.dataset import Dataset
from msi.errors import MSIError, shown
from msi.evaluate import ITEM_SETS, Evaluator
from msi.runtime import dataset_for, open_run
from msi.rundir import BEST, lock_holder, read_results
from msi.select import load_sweep, summarize

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
JSON_KEYS = ("metric", "split", "items", "n_users", "n_seeds", "a_mean", "b_mean", "delta", "ci95", "p_wilcoxon",
             "p_ttest_seeds")


@dataclass(frozen=True)
class Comparison:
    """What ``paired_stats`` finds; ``to_json`` gives exactly ``JSON_KEYS``."""

    metric: str
    split: str
    seeds: list[int]
    a_seeds: list[float]  # per-seed metric of A, in seed order
    b_seeds: list[float]
    n_users: int
    a_mean: float
    b_mean: float
    delta: float  # B - A
    ci95: tuple[float, float]
    p_wilcoxon: float
    p_ttest_seeds: float | None
    ttest_note: str = ""  # why p_ttest_seeds is None
    differ: tuple[str, ...] = ()  # the settings A and B differ in: "key: A's value(s) -> B's"
    items: str = "all"  # the split's rows scored: all, warm or cold items (msi.evaluate.ITEM_SETS)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "split": self.split, "items": self.items, "n_users": self.n_users, "n_seeds": len(self.seeds),
                "a_mean": self.a_mean, "b_mean": self.b_mean, "delta": self.delta, "ci95": list(self.ci95),
                "p_wilcoxon": self.p_wilcoxon, "p_ttest_seeds": self.p_ttest_seeds}


def bootstrap_ci(diff: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``diff`` (U,) over ``resamples`` draws of U entries with replacement."""
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(resamples)
    step = max(1, 2**22 // n)  # resamples per draw: about 4M indices (32 MB) at a time
    for start in range(0, resamples, step):
        m = min(step, resamples - start)
        means[start : start + m] = diff[rng.integers(0, n, size=(m, n))].mean(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p over ``diff`` (U,); zeros are dropped, so all zeros is p = 1.0 (scipy
    would return NaN with a warning)."""
    if not np.any(diff):
        return 1.0
    return float(scipy.stats.wilcoxon(diff).pvalue)


def ttest_seeds_p(a: np.ndarray, b: np.ndarray) -> tuple[float | None, str]:
    """Paired t-test p over seeds of per-seed metrics a (S,) and b (S,), or None and the reason it is undefined."""
    if len(a) < 2:
        return None, "one seed: no variance to test against"
    d = b - a
    if np.ptp(d) == 0:
        return None, "the per-seed differences are all equal: t is undefined"
    return float(scipy.stats.ttest_rel(b, a).pvalue), ""


def paired_stats(a: np.ndarray, b: np.ndarray, seeds: list[int], metric: str, split: str) -> Comparison:
    """The comparison of per-user metrics a (S, U) and b (S, U), rows paired by ``seeds`` (see the module doc)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != len(seeds) or a.shape[1] == 0:
        raise MSIError(f"per-user metrics of shapes {a.shape} and {b.shape} for {len(seeds)} seeds: expected two "
                       "equal (seeds, users) arrays")
    diff = b.mean(0) - a.mean(0)  # (U,) per user, averaged over seeds
    a_seeds, b_seeds = a.mean(1), b.mean(1)
    p_t, note = ttest_seeds_p(a_seeds, b_seeds)
    return Comparison(metric, split, list(seeds), a_seeds.tolist(), b_seeds.tolist(), a.shape[1],
                      float(a.mean()), float(b.mean()), float(diff.mean()), bootstrap_ci(diff), wilcoxon_p(diff),
                      p_t, note)


@dataclass(frozen=True)
class RunHead:
    """A run directory and what its best.pt says about it: the seed, the data fingerprint, the config."""

    run_dir: Path
    seed: int
    fingerprint: str
    cfg: Config


def read_runs(specs: list[str | Path], unfinished: bool = False) -> list[RunHead]:
    """The runs of ``RUN_DIR`` and ``SWEEP_DIR:CONFIG`` specs (the latter: that config's selected point). A run still
    training (its lock held) is refused; so is one that never finished (no results.json) unless ``unfinished``."""
    dirs: list[Path] = []
    for spec in map(str, specs):
        head, sep, config = spec.rpartition(":")
        if sep and not Path(spec).exists() and Path(head).is_dir():
            dirs += selected_run_dirs(Path(head), config)
        else:
            dirs.append(Path(spec))
    heads = []
    for d in dirs:
        pid = lock_holder(d)
        if pid is not None:
            raise MSIError(f"{d}: still training (msi-train pid {pid} holds it); compare it once it has finished")
        if not unfinished and read_results(d) is None:
            raise MSIError(f"{d}: not finished (no results.json): its best.pt is of an interrupted run; finish it "
                           "with msi-train --resume, or pass --unfinished to compare it as it is")
        ckpt = load_checkpoint(d / BEST)
        try:
            cfg = config_from_dict(ckpt["config"])
        except MSIError as e:  # e.g. a plugin's model that is not installed here
            raise MSIError(f"{d / BEST}: its config does not load here ({e})") from None
        heads.append(RunHead(d, cfg.train.seed, ckpt["data"].get("fingerprint", ""), cfg))
    return heads


def selected_run_dirs(sweep_dir: Path, config: str) -> list[Path]:
    """The run directories of ``config``'s selected point in the sweep folder ``sweep_dir`` (``msi.select``'s rule)."""
    _, trials, cfgs = load_sweep(sweep_dir)
    if config not in cfgs:
        raise MSIError(f"{sweep_dir}:{config}: the sweep has no config {shown(config)}; it has {', '.join(cfgs)}")
    chosen = summarize([t for t in trials if t.row == config], {config: cfgs[config].train.metric})
    selected = chosen[config]["selected"]
    if selected is None:
        raise MSIError(f"{sweep_dir}:{config}: no point has all its seeds finished, so none is selected")
    return [Path(d) for d in selected["run_dirs"]]


def pair_by_seed(a: list[RunHead], b: list[RunHead]) -> tuple[list[RunHead], list[RunHead]]:
    """A's and B's runs in the same seed order; one run per seed on each side, and the same seeds."""
    for side, heads in (("A", a), ("B", b)):
        seen: dict[int, Path] = {}
        for h in heads:
            if h.seed in seen:
                raise MSIError(f"{side}: {seen[h.seed]} and {h.run_dir} both have seed {h.seed}; give one run per seed")
            seen[h.seed] = h.run_dir
    sa, sb = sorted(h.seed for h in a), sorted(h.seed for h in b)
    if sa != sb:
        raise MSIError(f"the seeds differ: A has {sa}, B has {sb}; runs are paired by seed (train.seed)")
    return sorted(a, key=lambda h: h.seed), sorted(b, key=lambda h: h.seed)


def load_data(heads: list[RunHead], datasets: dict[str, Dataset] | None = None) -> dict[str, Dataset]:
    """One data set per data fingerprint of ``heads`` (added to ``datasets``), all with the same train, valid and
    test rows: the users of a split and their items are then the same for every run.

    Different fingerprints are accepted only over the same rows: the fingerprint also covers the feature shapes,
    so LightGCN (no features) and MSI on one data set differ in it.
    """
    datasets = {} if datasets is None else datasets
    for h in heads:
        if h.fingerprint not in datasets:
            datasets[h.fingerprint] = dataset_for(h.cfg, progress=False)
    first = heads[0]
    ref = datasets[first.fingerprint]
    for h in heads[1:]:
        data = datasets[h.fingerprint]
        if data is not ref and not all(np.array_equal(ref.split(s), data.split(s)) for s in ("train", "valid", "test")):
            raise MSIError(f"{first.run_dir} and {h.run_dir} were trained on different data (fingerprints "
                           f"{first.fingerprint[:12]} and {h.fingerprint[:12]}): their users differ; compare runs "
                           "of one data set")
    return datasets


def check_metric(metric: str) -> int:
    """The cut-off of a metric name such as ``recall@20``."""
    name, _, k = metric.partition("@")
    if name not in METRICS or not (k.isascii() and k.isdigit() and len(k) < 20) or not 1 <= int(k) <= MAX_INT:
        raise MSIError(f"--metric {shown(metric)}: expected {'|'.join(METRICS)} and a cut-off, e.g. recall@20")
    return int(k)


def score_runs(heads: list[RunHead], datasets: dict[str, Dataset], metric: str, split: str,
               device: torch.device | str = "cpu", progress: bool = True, items: str = "all") -> np.ndarray:
    """The per-user ``metric`` on ``split`` (its rows of ``items``: all, warm or cold) of each run's best.pt:
    (runs, users), users ascending."""
    k = check_metric(metric)
    evaluators: dict[tuple[str, bool], Evaluator] = {}
    rows = []
    for h in progress_bar(heads, desc="scoring runs", unit="run", show=progress and len(heads) >= 3):
        model, cfg, dataset, _ = open_run(h.run_dir / BEST, device, dataset=datasets[h.fingerprint])
        key = (h.fingerprint, cfg.eval.mask_valid_at_test)
        if key not in evaluators:
            evaluators[key] = Evaluator.from_config(dataset, device, cfg, [k], items=items)
        _, values = evaluators[key].per_user(model, split)
        rows.append(values[metric].cpu().numpy())
    return np.stack(rows)


def check_same_candidates(heads: list[RunHead], split: str) -> None:
    """At test, every run must mask the same items (``eval.mask_valid_at_test``) for its users' metrics to pair."""
    masks = {h.cfg.eval.mask_valid_at_test for h in heads}
    if split == "test" and len(masks) > 1:
        raise MSIError("the runs differ in eval.mask_valid_at_test, so their test candidates differ; compare runs "
                       "scored the same way")


def compare(a_specs: list[str | Path], b_specs: list[str | Path], metric: str = "recall@20", split: str = "valid",
            device: torch.device | str = "cpu", progress: bool = True, unfinished: bool = False,
            items: str = "all") -> Comparison:
    """Score A's and B's runs per user and compare them paired by seed (see the module doc); ``unfinished``: also
    runs without results.json (``read_runs``); ``items``: only the split's rows of warm or cold items
    (msi.evaluate's module doc)."""
    check_metric(metric)
    a, b = pair_by_seed(read_runs(a_specs, unfinished), read_runs(b_specs, unfinished))
    check_same_candidates(a + b, split)
    values = score_runs(a + b, load_data(a + b), metric, split, device, progress, items)
    c = paired_stats(values[: len(a)], values[len(a) :], [h.seed for h in a], metric, split)
    return replace(c, differ=setting_differences([h.cfg for h in a], [h.cfg for h in b]), items=items)


def setting_differences(a: list[Config], b: list[Config]) -> tuple[str, ...]:
    """``key: A's value(s) -> B's`` for each setting (``msi.config.settings``) whose values differ between the two
    sides; a key only one side's model has reads ``-`` on the other."""
    sides = [[settings(cfg) for cfg in side] for side in (a, b)]
    keys = dict.fromkeys(k for side in sides for s in side for k in s)
    values = {k: [", ".join(sorted({s.get(k, "-") for s in side})) for side in sides] for k in keys}
    return tuple(f"{k}: {va} -> {vb}" for k, (va, vb) in values.items() if va != vb)


def ours_markdown(path: Path) -> bool:
    """Whether ``path`` holds msi-compare's markdown summary (``render_markdown``'s first line)."""
    notes = "|".join(re.escape(_items_note(items)) for items in ITEM_SETS)
    return re.match(rf"\w+@\d+ on (valid|test)({notes}): \d+ users", _text(path)) is not None


def _items_note(items: str) -> str:
    """What the first line of ``render_markdown`` says of ``items`` (nothing for all items)."""
    return "" if items == "all" else f" ({items} items only)"


def ours_json(path: Path) -> bool:
    """Whether ``path`` holds msi-compare's JSON statistics (exactly ``JSON_KEYS``)."""
    try:
        return list(json.loads(_text(path))) == list(JSON_KEYS)
    except (ValueError, TypeError):
        return False


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _p(p: float | None, note: str = "") -> str:
    return f"n/a ({note})" if p is None else f"{p:.3g}"


def _differ_lines(differ: tuple[str, ...]) -> list[str]:
    if len(differ) <= 1:
        return [f"Setting that differs (A -> B): {differ[0]}"] if differ else []
    return [f"A and B differ in {len(differ)} settings, so the delta is not one setting's effect (A -> B):",
            *(f"- {d}" for d in differ)]


def render_markdown(c: Comparison, a_label: str = "A", b_label: str = "B") -> str:
    """A per-seed table and the statistics, for a terminal or a .md file."""
    first = f"{c.metric} on {c.split}{_items_note(c.items)}: {c.n_users} users, {len(c.seeds)} seeds (paired by seed)"
    lines = [first, "",
             f"A: {a_label}", f"B: {b_label}", *_differ_lines(c.differ), "", "| seed | A | B | B - A |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {s} | {x:.4f} | {y:.4f} | {y - x:+.4f} |" for s, x, y in zip(c.seeds, c.a_seeds, c.b_seeds)]
    lines += [f"| mean | {c.a_mean:.4f} | {c.b_mean:.4f} | {c.delta:+.4f} |", "",
              f"- delta B - A: {c.delta:+.4f}, 95% CI [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}] (paired bootstrap over "
              f"users of the metric averaged over seeds; {BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED})",
              f"- Wilcoxon signed-rank over users: p = {_p(c.p_wilcoxon)}",
              f"- paired t-test over seeds: p = {_p(c.p_ttest_seeds, c.ttest_note)}"]
    return "\n".join(lines) + "\n"


def baseline_section(summary: dict[str, Any], baseline: str, device: torch.device | str = "cpu",
                     progress: bool = True) -> str:
    """Markdown: each config's selected point against ``baseline``'s on test, by the baseline's ``train.metric``.

    ``summary``: what ``msi.select.report`` returns. A config that cannot be paired with the baseline (no selected
    point, other seeds, other data) gets a row saying why instead of stopping the report.
    """
    configs = summary["configs"]
    if baseline not in configs:
        raise MSIError(f"--baseline {shown(baseline)}: the sweep's configs are {', '.join(configs)}")
    if configs[baseline]["selected"] is None:
        raise MSIError(f"--baseline {baseline}: none of its points is selected (no point has all its seeds finished)")
    metric = configs[baseline]["metric"]
    base = read_runs(configs[baseline]["selected"]["run_dirs"])
    datasets: dict[str, Dataset] = {}
    base_values = None
    lines = [f"Each config's selected point against {baseline}'s, on test, {metric}: delta = config - {baseline}, "
             f"95% CI by paired bootstrap over users ({BOOTSTRAP_RESAMPLES:,} resamples), Wilcoxon over users, "
             "paired t-test over seeds.", "",
             f"| config | n users | n seeds | {baseline} | config | delta | 95% CI | p Wilcoxon | p t-test seeds |",
             "|---" * 9 + "|"]
    for name, c in configs.items():
        if name == baseline:
            continue
        if c["selected"] is None:
            lines.append(f"| {name} | | | | | none selected | | | |")
            continue
        try:
            a, b = pair_by_seed(base, read_runs(c["selected"]["run_dirs"]))
            check_same_candidates(a + b, "test")
            load_data(a + b, datasets)
            if base_values is None:
                base_values = score_runs(a, datasets, metric, "test", device, progress)
            cmp = paired_stats(base_values, score_runs(b, datasets, metric, "test", device, progress),
                               [h.seed for h in a], metric, "test")
        except MSIError as e:
            lines.append(f"| {name} | | | | | not compared: {e} | | | |")
            continue
        p_t = "n/a" if cmp.p_ttest_seeds is None else f"{cmp.p_ttest_seeds:.3g}"
        lines.append(f"| {name} | {cmp.n_users} | {len(cmp.seeds)} | {cmp.a_mean:.4f} | {cmp.b_mean:.4f} | "
                     f"{cmp.delta:+.4f} | [{cmp.ci95[0]:+.4f}, {cmp.ci95[1]:+.4f}] | {cmp.p_wilcoxon:.3g} | {p_t} |")
    return "\n".join(lines) + "\n"

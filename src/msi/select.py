"""Valid-only selection over a sweep's run directories, and its tables: results.md, results.csv, summary.json.

A sweep is configs x grid points x seeds; each trial is one ordinary run directory
``<out>/<config>_<key-value...>_s<seed>/``. The rule, in one place (``summarize``): per config and data set (a table
row, ``split_rows``), the grid point with the best mean valid ``train.metric`` over its seeds wins; a point is
eligible only when every seed has finished (a readable ``results.json``) and none was stopped early
(``stopped.json``, written when ASHA stops a trial); test numbers are read only for the selected point. A damaged
results.json (``msi.rundir.DamagedRunFile``) counts as unfinished: the sweep runs the trial again and the tables
name the file. The sweep folder itself (the plan of trials, ``sweep.yaml``) is ``msi.sweepdir``'s; the tables can
be re-rendered from the run directories alone (``report``).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from msi.config import NOT_A_SETTING, Config
from msi.errors import MSIError, read_utf8
from msi.files import check_replace, write_text
from msi.rundir import DamagedRunFile, read_results
from msi.sweepdir import SWEEP_FILE, Trial, plan_trials, read_sweep, trial_config, trial_state


def damaged_results(trials: list[Trial]) -> list[str]:
    """One line per trial whose results.json is damaged (it counts as unfinished), naming the file."""
    out = []
    for t in trials:
        try:
            read_results(t.run_dir)
        except DamagedRunFile as e:
            out.append(f"{e}; counted as unfinished: run the sweep command again to finish it")
    return out


def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value) and n."""
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values), "values": values}


def _results(run_dir: Path) -> dict[str, Any]:
    """The results.json of a trial ``trial_state`` found done."""
    results = read_results(run_dir)
    if results is None:
        raise MSIError(f"{run_dir}: results.json disappeared while the tables were written")
    return results


def _values(group: list[Trial], split: str, key: str) -> list[float]:
    """``split``'s ``key`` of each finished trial of ``group``; a results.json without it is named."""
    values = []
    for t in group:
        results = _results(t.run_dir)
        if key not in results[split]:
            raise MSIError(f"{t.run_dir / 'results.json'}: {split} has no {key} (it has "
                           f"{', '.join(results[split]) or 'no metrics'}); train the trial again")
        values.append(results[split][key])
    return values


def summarize(trials: list[Trial], metrics: dict[str, str]) -> dict[str, Any]:
    """Select per table row (``metrics``: row -> its ``train.metric``) on valid only; see the module doc."""
    by_point: dict[str, dict[tuple[str, ...], list[Trial]]] = {}
    for t in trials:
        by_point.setdefault(t.row, {}).setdefault(t.point, []).append(t)
    out: dict[str, Any] = {}
    for name, points in by_point.items():
        metric, grid = metrics[name], []
        for point, group in points.items():
            states = [trial_state(t.run_dir) for t in group]
            valid = _values([t for t, s in zip(group, states) if s == "done"], "valid", metric)
            grid.append({"point": list(point), "valid": stats(valid), "finished": len(valid),
                         "stopped": states.count("stopped"), "eligible": states.count("done") == len(group)})
        eligible = [g for g in grid if g["eligible"]]
        best = max(eligible, key=lambda g: g["valid"]["mean"], default=None)  # first of equals: grid order
        out[name] = {"metric": metric, "grid": grid, "selected": best and _selected(points[tuple(best["point"])])}
    return out


def chosen_on_test(trials: list[Trial], metrics: dict[str, str]) -> dict[str, Any]:
    """What MMRec's rule would report (it selects the grid point best on test, MMRec issue #64): per table row, the
    eligible point with the best mean test ``metric`` and that mean. It reads test at every point, so it is never a
    selection here: it only measures how optimistic selecting on test is, beside the point chosen on valid."""
    by_point: dict[str, dict[tuple[str, ...], list[Trial]]] = {}
    for t in trials:
        by_point.setdefault(t.row, {}).setdefault(t.point, []).append(t)
    out: dict[str, Any] = {}
    for name, points in by_point.items():
        eligible = [(p, g) for p, g in points.items() if all(trial_state(t.run_dir) == "done" for t in g)]
        scored = [(stats(_values(g, "test", metrics[name])), p) for p, g in eligible]
        best = max(scored, key=lambda x: x[0]["mean"], default=None)  # first of equals: grid order
        out[name] = best and {"point": list(best[1]), "metric": metrics[name], "test": best[0]}
    return out


def _selected(group: list[Trial]) -> dict[str, Any]:
    """Valid and test metrics of the selected point, the only place test numbers are read."""
    keys = list(_results(group[0].run_dir)["test"])
    return {"point": list(group[0].point), "run_dirs": [str(t.run_dir) for t in group],
            "valid": {k: stats(_values(group, "valid", k)) for k in keys},
            "test": {k: stats(_values(group, "test", k)) for k in keys},
            "best_epoch": [_results(t.run_dir)["best_epoch"] for t in group]}


def popularity_floor(cfg: Config, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Valid and test metrics of the popularity baseline (items ranked by train count) on ``cfg``'s data."""
    from msi.evaluate import Evaluator, popularity_metrics
    from msi.runtime import dataset_for, resolve_device

    data = dataset_for(cfg, progress=False)
    return popularity_metrics(Evaluator.from_config(data, resolve_device(device), cfg))


def split_rows(trials: list[Trial], data: dict[Path, str]) -> list[Trial]:
    """``trials`` with their table rows (``data``: run directory -> data.name): a config's name, or ``name@data``
    for each data set when its trials use several. A selection compares numbers of one data set only."""
    sets: dict[str, set[str]] = {}
    for t in trials:
        sets.setdefault(t.config.stem, set()).add(data[t.run_dir])
    return [replace(t, row=t.config.stem if len(sets[t.config.stem]) == 1 else f"{t.config.stem}@{data[t.run_dir]}")
            for t in trials]


def row_configs(trials: list[Trial], configs: dict[Path, Config]) -> dict[str, Config]:
    """One config per table row (its first trial's, by run directory in ``configs``); a row needs one metric."""
    cfgs: dict[str, Config] = {}
    for t in trials:
        cfg = configs[t.run_dir]
        if cfgs.setdefault(t.row, cfg).train.metric != cfg.train.metric:
            raise MSIError(f"{t.config}: train.metric differs between the trials of {t.row} "
                           f"({cfgs[t.row].train.metric}, {cfg.train.metric}); selection needs one metric")
    return cfgs


def _load(out: Path, unstarted: bool = False) -> tuple[dict[str, Any], list[Trial], dict[Path, Config]]:
    """The record of ``<out>/sweep.yaml``, its trials and each trial's config by run directory; a folder that holds
    none of its trial directories is refused unless ``unstarted`` (they were moved, or no trial has started)."""
    record = read_sweep(out)
    trials = plan_trials([Path(c) for c in record["configs"]], record["grid"], record["seeds"], out)
    if not unstarted and trials and not any(t.run_dir.is_dir() for t in trials):
        raise MSIError(f"{out}: holds none of its sweep's {len(trials)} trial directories (such as "
                       f"{trials[0].name}): no trial has started, or they were moved out of it")
    return record, trials, {t.run_dir: trial_config(t, record["set"]) for t in trials}


def load_sweep(out: Path, unstarted: bool = False) -> tuple[dict[str, Any], list[Trial], dict[str, Config]]:
    """The record of ``<out>/sweep.yaml``, its trials with their table rows (``split_rows``), one config per row;
    ``unstarted``: accept a folder where no trial has started (``_load``)."""
    record, trials, configs = _load(Path(out), unstarted)
    trials = split_rows(trials, {d: c.data.name for d, c in configs.items()})
    return record, trials, row_configs(trials, configs)


Extra = Callable[[dict[str, Any]], str]  # a summary -> markdown that results.md ends with


def report(out: Path, unstarted: bool = False, extra: Extra | None = None, by_test: bool = False) -> dict[str, Any]:
    """Re-read ``<out>``'s run directories, select, and write results.md, results.csv and summary.json;
    ``unstarted``: also when no trial has started (the end of a sweep stopped before any did); ``extra``: a section
    results.md ends with (msi.compare.baseline_section), made before any table is written; ``by_test``: also the
    column of what selecting on test would report (``chosen_on_test``)."""
    out = Path(out)
    record, trials, cfgs = load_sweep(out, unstarted)
    head = {"out": str(out.resolve()), "seeds": record["seeds"], "grid": record["grid"], "set": record["set"]}
    return _write_tables(out, head, trials, cfgs, extra, by_test)


TABLES = ("summary.json", "results.md", "results.csv")


def _write_tables(dest: Path, head: dict[str, Any], trials: list[Trial], cfgs: dict[str, Config],
                  extra: Extra | None = None, by_test: bool = False) -> dict[str, Any]:
    """Select over ``trials``, add the popularity floor of each data set, and write the three tables to ``dest``
    (the one writer of a sweep's tables; ``extra``'s section ends results.md)."""
    floors = {}
    for cfg in cfgs.values():
        if cfg.data.name not in floors:
            floors[cfg.data.name] = popularity_floor(cfg)
    metrics = {name: cfg.train.metric for name, cfg in cfgs.items()}
    summary = {**head, "configs": summarize(trials, metrics), "popularity": floors, "damaged": damaged_results(trials)}
    if by_test:
        summary["chosen_on_test"] = chosen_on_test(trials, metrics)
    dest.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summary) + ("\n" + extra(summary) if extra else "")
    texts = (json.dumps(summary, indent=2) + "\n", markdown, render_csv(summary))
    for name, text in zip(TABLES, texts):
        write_text(dest / name, text)
    return summary


def union_trials(outs: list[Path]) -> tuple[list[Trial], dict[str, Config], list[int]]:
    """The trials of several sweep folders as one grid, for a grid run in parts (on several machines, or a part
    re-run later): each trial's point becomes its folder's ``--set`` overrides that not every folder shares (less
    ``NOT_A_SETTING``) plus its grid point, sorted by key. A trial found in several folders counts once: its
    finished copy, else any copy; two finished copies are refused unless their results.json are the same (a copied
    run directory). The seeds must be the same everywhere. Folders of different data sets are selected apart, one
    row per config and data set (``split_rows``)."""
    loaded = [(Path(o), *_load(Path(o))) for o in outs]
    seeds = loaded[0][1]["seeds"]
    sets = [[o for o in rec["set"] if o.partition("=")[0] not in NOT_A_SETTING] for _, rec, _, _ in loaded]
    shared = set.intersection(*(set(x) for x in sets))
    trials: dict[tuple[str, str, tuple[str, ...], int], Trial] = {}
    configs: dict[Path, Config] = {}
    for (out, rec, folder_trials, folder_configs), overrides in zip(loaded, sets):
        if rec["seeds"] != seeds:
            raise MSIError(f"{out}: seeds {rec['seeds']} differ from {loaded[0][0]}'s {seeds}; a union needs the same")
        label = [o for o in overrides if o not in shared]
        configs.update(folder_configs)
        for t in folder_trials:
            point = tuple(sorted({o.partition("=")[0]: o for o in [*label, *t.point]}.values()))
            key = (t.config.stem, folder_configs[t.run_dir].data.name, point, t.seed)
            other = trials.get(key)
            if other is not None and trial_state(other.run_dir) == trial_state(t.run_dir) == "done":
                if _results(other.run_dir) == _results(t.run_dir):
                    continue  # a copy of the same run
                raise MSIError(f"{other.run_dir} and {t.run_dir}: the same trial finished twice; keep one")
            if other is None or trial_state(t.run_dir) == "done":
                trials[key] = replace(t, point=point)
    merged = split_rows(list(trials.values()), {d: c.data.name for d, c in configs.items()})
    return merged, row_configs(merged, configs), seeds


def union_report(outs: list[Path], dest: Path, extra: Extra | None = None, by_test: bool = False) -> dict[str, Any]:
    """``report`` over the union of several sweep folders (``union_trials``), written to ``dest``: one selection,
    by the same rule, over every point of every folder; test is read for the selected point only. ``dest`` must be
    new, or hold no tables but an earlier union's."""
    dest = Path(dest)
    if (dest / SWEEP_FILE).is_file():
        raise MSIError(f"{dest}: holds a sweep; write the union to a folder of its own")
    ours = _union_tables(dest)  # before any table of the new union replaces summary.json
    for name in TABLES:
        check_replace(dest / name, lambda _: ours, "msi-sweep --report (a union)")
    trials, cfgs, seeds = union_trials(outs)
    head = {"out": [str(Path(o).resolve()) for o in outs], "seeds": seeds, "grid": [], "set": []}
    return _write_tables(dest, head, trials, cfgs, extra, by_test)


def read_summary(dest: Path) -> dict[str, Any] | None:
    """``dest``'s summary.json as ``report`` or ``union_report`` wrote it; None when there is none (or another file
    of that name)."""
    try:
        summary = json.loads(read_utf8(Path(dest) / TABLES[0], MSIError))
    except (OSError, ValueError, MSIError):
        return None
    return summary if isinstance(summary, dict) and "configs" in summary else None


def _union_tables(dest: Path) -> bool:
    """Whether ``dest``'s summary.json is one that ``union_report`` wrote (its ``out`` lists the folders)."""
    summary = read_summary(dest)
    return summary is not None and isinstance(summary.get("out"), list)


def _ms(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def _point(point: list[str]) -> str:
    """A grid point as the tables write it; the empty point (a folder run without --grid) says so."""
    return " ".join(point) or "(the config as written)"


def _columns(summary: dict[str, Any]) -> list[str]:
    keys = [k for c in summary["configs"].values() if c["selected"] for k in c["selected"]["test"]]
    keys += [k for f in summary["popularity"].values() for k in f["test"]]
    chosen = {c["metric"] for c in summary["configs"].values()}  # a selection by hit@20 shows test hit@20 too
    return list(dict.fromkeys(k for k in keys if k.split("@")[0] in ("recall", "ndcg") or k in chosen))


def render_markdown(summary: dict[str, Any]) -> str:
    cols = _columns(summary)
    seeds = ", ".join(map(str, summary["seeds"]))
    on_test = summary.get("chosen_on_test")  # msi-sweep --report --mmrec-rule
    lines = [f"Selected per config on the mean valid metric over seeds {seeds} (only points whose seeds all "
             "finished are eligible); test is read for the selected point only. Mean ± sample std over n seeds.",
             *(["The last column reads test at every point: what MMRec's rule (the point best on test) would "
                "report; it selects nothing here and shows how optimistic that rule is."] if on_test else []),
             "", "| config | selected point | n | " + " | ".join(f"test {c}" for c in cols)
             + " | valid (selection metric) | best epochs |" + (" chosen on test (MMRec's rule) |" if on_test else ""),
             "|---" * (len(cols) + 5 + bool(on_test)) + "|"]
    for name, c in summary["configs"].items():
        s = c["selected"]
        rule = f" {_on_test(on_test[name])} |" if on_test else ""
        if s is None:
            lines.append(f"| {name} | none eligible | 0 |" + " |" * len(cols) + " | |" + rule)
            continue
        cells = [_ms(s["test"][k]) if k in s["test"] else "" for k in cols]
        lines.append(f"| {name} | {_point(s['point'])} | {len(s['run_dirs'])} | " + " | ".join(cells)
                     + f" | {c['metric']} {_ms(s['valid'][c['metric']])} | {'/'.join(map(str, s['best_epoch']))} |"
                     + rule)
    for data, floor in summary["popularity"].items():
        cells = [f"{floor['test'][k]:.4f}" if k in floor["test"] else "" for k in cols]
        lines.append(f"| popularity, {data} | - | - | " + " | ".join(cells) + " | | - |" + (" |" if on_test else ""))
    for name, c in summary["configs"].items():
        if len(c["grid"]) > 1:
            lines += ["", f"Grid of {name}: valid {c['metric']}, mean ± std over seeds (test not read)", "",
                      "| point | valid | finished | eligible |", "|---|---|---|---|"]
            chosen = c["selected"]["point"] if c["selected"] else None
            lines += [f"| {_point(g['point'])}{' (selected)' if g['point'] == chosen else ''} | {_ms(g['valid'])} "
                      f"| {g['finished']} | {'yes' if g['eligible'] else 'no'} |" for g in c["grid"]]
    if summary.get("damaged"):
        lines += ["", "Damaged run files:", "", *(f"- {d}" for d in summary["damaged"])]
    return "\n".join(lines) + "\n"


def _on_test(chosen: dict[str, Any] | None) -> str:
    """The MMRec-rule cell: test metric mean ± std at the point best on test, and that point."""
    return "-" if chosen is None else f"{chosen['metric']} {_ms(chosen['test'])} at {_point(chosen['point'])}"


def render_csv(summary: dict[str, Any]) -> str:
    """Long format: one row per (config, point, role, split, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["config", "point", "role", "split", "metric", "mean", "std", "n"])
    for name, c in summary["configs"].items():
        for g in c["grid"]:
            v = g["valid"]
            w.writerow([name, " ".join(g["point"]), "grid", "valid", c["metric"], v["mean"], v["std"], v["n"]])
        s = c["selected"]
        for split in ("valid", "test") if s else ():
            for k, v in s[split].items():
                w.writerow([name, " ".join(s["point"]), "selected", split, k, v["mean"], v["std"], v["n"]])
    for data, floor in summary["popularity"].items():
        for split in ("valid", "test"):
            w.writerows([f"popularity, {data}", "", "popularity", split, k, v, "", ""] for k, v in floor[split].items())
    return buf.getvalue()

"""Compare models over seeds with valid-only selection, and write a Markdown results table.

Each (config, grid point, seed) is one ``msi-train`` run in its own directory (runs go in parallel with --jobs).
A grid (``--grid loss.alpha=0.1,0.01``) is searched on mean valid Recall@20 over the seeds; only the selected point
is reported. Test is scored once per run, by the trainer, with the checkpoint chosen on valid. A popularity row
(items ranked by train count) is the floor. ``--probe`` adds the modality probe (items represented by their ID or
a modality view) for the named configs.

Example (the TikTok table of docs/results.md):
    python scripts/compare.py --configs configs/tiktok.yaml configs/tiktok_bm3.yaml ... \
        --seeds 999 42 2026 --jobs 8 --out runs/tiktok --probe tiktok tiktok_bm3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def grid_points(grid: list[str]) -> list[list[str]]:
    """``["a.b=1,2", "c.d=x"]`` -> every combination as override lists."""
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def run_all(
    jobs: list[tuple[Path, list[str], Path]], n_parallel: int, device: str, extra: list[str], deadline: float
) -> None:
    """Run ``msi-train`` for every (config, overrides, run dir) not already finished, n_parallel at a time.

    A run with a ``last.pt`` but no ``results.json`` (stopped earlier) is resumed. Past ``deadline`` (a
    ``time.time()`` value) running jobs are stopped and nothing new starts; a later call resumes them.
    """
    todo = [j for j in jobs if not (j[2] / "results.json").is_file()]
    running: list[tuple[subprocess.Popen, Path]] = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    while todo or running:
        while todo and len(running) < n_parallel and time.time() < deadline:
            config, overrides, run_dir = todo.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / "last.pt").is_file():
                cmd = [sys.executable, "-m", "msi.cli", "train", "--resume", str(run_dir), "--quiet", "--device", device]
            else:
                cmd = [sys.executable, "-m", "msi.cli", "train", "--config", str(config), *overrides, *extra,
                       "--out", str(run_dir), "--quiet", "--device", device]
            log = open(run_dir.with_name(run_dir.name + ".log"), "a")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), run_dir))
        if time.time() >= deadline:
            todo.clear()
            for proc, run_dir in running:
                proc.terminate()
                print(f"[{time.strftime('%H:%M:%S')}] {run_dir.name}: stopped at the deadline", flush=True)
            for proc, _ in running:
                proc.wait()
            return
        time.sleep(0.5)
        for proc, run_dir in list(running):
            if proc.poll() is not None:
                running.remove((proc, run_dir))
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {run_dir}.log"
                print(f"[{time.strftime('%H:%M:%S')}] {run_dir.name}: {status}", flush=True)


def read_results(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def popularity_row(config: Path, device: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    from msi.config import load_config
    from msi.evaluate import Evaluator
    from msi.models import Popularity
    from msi.run import dataset_for, resolve_device

    cfg = load_config(config, [*overrides, "model.name=lightgcn"])
    data = dataset_for(cfg, progress=False)
    dev = resolve_device(device)
    ev = Evaluator(data, dev, cfg.eval.ks, cfg.eval.batch_users, cfg.eval.mask_valid_at_test)
    model = Popularity(data.n_users, data.n_items, data.train).to(dev)
    return {"valid": ev(model, "valid"), "test": ev(model, "test")}


def probe(run_dirs: list[Path], device: str) -> dict[str, dict[str, list[float]]]:
    """Valid and test Recall@20 with items represented by each view, per seed."""
    from msi.evaluate import Evaluator
    from msi.run import open_run, resolve_device

    out: dict[str, dict[str, list[float]]] = {}
    dev = resolve_device(device)
    for run_dir in run_dirs:
        model, cfg, data, _ = open_run(run_dir / "best.pt", dev)
        ev = Evaluator(data, dev, [20], cfg.eval.batch_users, cfg.eval.mask_valid_at_test)
        for view in model.item_views:
            for split in ("valid", "test"):
                out.setdefault(view, {}).setdefault(split, []).append(ev(model, split, view)["recall@20"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True, type=Path, help="one YAML per compared model")
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 42, 2026])
    p.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 axes searched on valid for --grid-configs")
    p.add_argument("--grid-configs", nargs="*", default=[], help="config names (file stems) the grid applies to")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run (e.g. train.epochs=5)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True, help="folder of the run directories and the tables")
    p.add_argument("--probe", nargs="*", default=[], help="config names to run the modality probe on")
    p.add_argument("--title", default="Results")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds after which running jobs stop (resumable) and the table covers finished runs")
    args = p.parse_args(argv)

    jobs, plan = [], {}
    for config in args.configs:
        points = grid_points(args.grid) if config.stem in args.grid_configs else [[]]
        for point in points:
            tag = config.stem + "".join(f"_{o.replace('=', '-')}" for o in point)
            dirs = [args.out / f"{tag}_s{s}" for s in args.seeds]
            plan.setdefault(config.stem, []).append((point, dirs))
            jobs += [(config, [*point, f"train.seed={s}"], d) for s, d in zip(args.seeds, dirs)]
    t0 = time.time()
    run_all(jobs, args.jobs, args.device, args.set, t0 + args.deadline)
    summary = summarize(plan, args, time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = render(summary, args)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


def summarize(plan: dict, args: argparse.Namespace, seconds: float) -> dict:
    summary: dict = {"seeds": args.seeds, "seconds": seconds, "models": {}, "grids": {}}
    for name, points in plan.items():
        scored = []
        for point, dirs in points:
            res = [r for r in (read_results(d) for d in dirs) if r]
            valid = [r["valid"]["recall@20"] for r in res]
            scored.append((statistics.mean(valid) if valid else -1.0, point, dirs, res))
        if len(points) > 1:
            summary["grids"][name] = [{"point": pt, "valid_recall@20": v, "runs": len(r)} for v, pt, _, r in scored]
        best_valid, point, dirs, res = max(scored, key=lambda s: s[0])  # selection on valid only
        summary["models"][name] = {
            "selected": point, "runs": len(res),
            "test": {c: [r["test"][c] for r in res] for c in COLUMNS},
            "valid_recall@20": [r["valid"]["recall@20"] for r in res],
            "best_epoch": [r["best_epoch"] for r in res],
            "probe": probe([d for d in dirs if (d / "results.json").is_file()], args.device) if name in args.probe else None,
        }
    summary["popularity"] = popularity_row(args.configs[0], args.device, args.set)
    return summary


def render(summary: dict, args: argparse.Namespace) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"## {args.title}", "",
             f"Test metrics at the checkpoint chosen on valid Recall@20, mean ± std over seeds {seeds}.",
             f"Machine: {platform.node() or 'unknown'}, device `{args.device}`; wall time {summary['seconds']:.0f} s.",
             "", "| model | " + " | ".join(f"test {c}" for c in COLUMNS) + " | valid R@20 | best epoch |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, m in summary["models"].items():
        sel = f" ({' '.join(m['selected'])})" if m["selected"] else ""
        if m["runs"] < len(summary["seeds"]):
            sel += f" [{m['runs']} of {len(summary['seeds'])} runs finished]"
        cells = [mean_std(m["test"][c]) for c in COLUMNS]
        epochs = "/".join(map(str, m["best_epoch"]))
        lines.append(f"| {name}{sel} | " + " | ".join(cells) + f" | {mean_std(m['valid_recall@20'])} | {epochs} |")
    pop = summary["popularity"]
    lines.append("| popularity | " + " | ".join(f"{pop['test'][c]:.4f}" for c in COLUMNS)
                 + f" | {pop['valid']['recall@20']:.4f} | - |")
    for name, rows in summary["grids"].items():
        lines += ["", f"Grid for {name} (mean valid R@20 over seeds; the best is selected):", "",
                  "| point | valid R@20 | runs |", "|---|---|---|"]
        lines += [f"| {' '.join(r['point'])} | {r['valid_recall@20']:.4f} | {r['runs']} |" for r in rows]
    for name, m in summary["models"].items():
        if m["probe"]:
            lines += ["", f"Modality probe, {name}: Recall@20 with items represented by each view", "",
                      "| item view | valid R@20 | test R@20 |", "|---|---|---|"]
            lines += [f"| {v} | {mean_std(s['valid'])} | {mean_std(s['test'])} |" for v, s in m["probe"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

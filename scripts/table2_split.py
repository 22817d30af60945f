"""Table 2 split by the test items a model can know from training: warm items (with a train row) and cold ones (none).

    python scripts/table2_split.py UNION_DIR [--device DEVICE] [--out FILE.md]

UNION_DIR is the folder ``msi-sweep --report`` wrote over every model's confirm folders (scripts/table2.sh report:
STUDY_DIR/table2). For each config's selected point (chosen on valid by that report; nothing is chosen here) each
seed's best.pt is scored on test twice, once on the rows of warm items and once on the rows of cold items (msi-eval
--items warm|cold: every item stays a candidate, only the ground truth is restricted), and the table gives the mean
± sample std over the seeds of Recall@10, Recall@20, NDCG@10 and NDCG@20, with the popularity floor scored the same
way. A cold item has no train row, so only a model that reads item features can rank it above the others.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from msi.data.dataset import Dataset
from msi.errors import MSIError
from msi.evaluate import Evaluator, popularity_metrics
from msi.files import starts_with, write_text
from msi.runtime import open_run, resolve_device
from msi.select import read_summary

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
ITEMS = ("warm", "cold")


def selected_runs(union: Path) -> dict[str, list[Path]]:
    """Each config's selected run directories in ``union``'s summary.json, in the report's order."""
    summary = read_summary(union)
    if summary is None:
        raise MSIError(f"{union}: no summary.json of msi-sweep (run msi-sweep --report over the confirm folders "
                       "with --out there first)")
    runs = {}
    for name, row in summary["configs"].items():
        selected = row.get("selected")
        if selected:  # a config none of whose points finished every seed has no selected point: left out
            runs[name] = [Path(d) for d in selected["run_dirs"]]
    if not runs:
        raise MSIError(f"{union}/summary.json: no config has a selected point")
    return runs


def test_rows(dataset: Dataset) -> dict[str, int]:
    """How many test rows have a warm item (one with a train row) and how many a cold one."""
    warm = np.isin(dataset.test[:, 1], dataset.train[:, 1])
    return {"warm": int(warm.sum()), "cold": int((~warm).sum())}


def score(run_dirs: list[Path], device: torch.device) -> tuple[dict[str, list[dict]], Dataset]:
    """Per item set that has test rows, each run's test metrics (one dict per run); and the last run's data set."""
    out: dict[str, list[dict]] = {items: [] for items in ITEMS}
    for run in run_dirs:
        model, cfg, dataset, _ = open_run(run / "best.pt", device)
        for items, n in test_rows(dataset).items():
            if n:
                out[items].append(Evaluator.from_config(dataset, device, cfg, items=items)(model, "test"))
    return out, dataset


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def table(rows: dict[str, dict[str, list[dict]]], floor: dict[str, float], items: str) -> list[str]:
    head = "| config | n | " + " | ".join(f"test {m}" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for name, scored in rows.items():
        runs = scored[items]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cell([r[m] for r in runs]) for m in METRICS) + " |")
    lines.append("| popularity | - | " + " | ".join(f"{floor[m]:.4f}" for m in METRICS) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("union", type=Path, help="the folder msi-sweep --report --out wrote over the confirm folders")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if this script did not write it")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        runs = selected_runs(args.union)
        rows, folders = {}, {}
        for name, dirs in runs.items():
            rows[name], dataset = score(dirs, device)
            folders[str(dataset.path.resolve())] = dataset
        if len(folders) != 1:
            raise MSIError(f"{args.union}: the selected runs read {len(folders)} data folders "
                           f"({', '.join(folders)}); the table needs one")
        counts = test_rows(dataset)
        floors = {items: popularity_metrics(Evaluator(dataset, device, items=items))["test"]
                  for items in ITEMS if counts[items]}
    except MSIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = []
    for items in ITEMS:
        what = f"Test rows of {items} items ({'with' if items == 'warm' else 'without'} a train row): {counts[items]}"
        if counts[items]:
            lines += [f"{what}; mean ± sample std over the seeds:", "", *table(rows, floors[items], items), ""]
        else:
            lines += [f"{what}: nothing to score.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:  # replaces only a table this script wrote, unless --overwrite
        try:
            write_text(args.out, text, starts_with(b"Test rows of warm"), "table2_split.py", "--overwrite",
                       args.overwrite)
        except MSIError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

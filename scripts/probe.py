"""The modality probe of a finished msi-sweep: Recall@20 of each config's selected runs with items represented by
their ID view or one modality's view (the paper's Table 1 question: what does each view carry?).

Selection is msi-sweep's alone (msi.select, valid only); this script reads ``<sweep>/summary.json`` and scores the
runs of the selected point, writing ``<sweep>/probe.md``. Example (docs/results.md):
    msi-sweep --config configs/tiktok_bm3.yaml ... --seeds 999 42 2026 --out runs/tiktok
    python scripts/probe.py runs/tiktok --probe tiktok_bm3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def probe(run_dirs: list[Path], device: str) -> dict[str, dict[str, list[float]]]:
    """Valid and test Recall@20 with items represented by each view, per seed."""
    from msi.evaluate import Evaluator
    from msi.runtime import open_run, resolve_device
    from msi.rundir import BEST

    out: dict[str, dict[str, list[float]]] = {}
    dev = resolve_device(device)
    for run_dir in run_dirs:
        model, cfg, data, _ = open_run(run_dir / BEST, dev)
        ev = Evaluator.from_config(data, dev, cfg, [20])
        for view in model.item_views:
            for split in ("valid", "test"):
                out.setdefault(view, {}).setdefault(split, []).append(ev(model, split, view)["recall@20"])
    return out


def mean_std(values: list[float]) -> str:
    sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{sd}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a folder written by msi-sweep")
    p.add_argument("--probe", nargs="+", required=True, help="config names (file stems) to probe")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    summary = json.loads((args.sweep / "summary.json").read_text())
    lines = []
    for name in args.probe:
        selected = summary["configs"][name]["selected"]
        if selected is None:
            print(f"{name}: no point selected yet; finish the sweep first", file=sys.stderr)
            continue
        views = probe([Path(d) for d in selected["run_dirs"]], args.device)
        lines += [f"Modality probe, {name} ({' '.join(selected['point']) or 'no grid'}): Recall@20 with items "
                  "represented by each view", "", "| item view | valid R@20 | test R@20 |", "|---|---|---|"]
        lines += [f"| {v} | {mean_std(s['valid'])} | {mean_std(s['test'])} |" for v, s in views.items()] + [""]
    (args.sweep / "probe.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

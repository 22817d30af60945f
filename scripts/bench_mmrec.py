"""The MMRec reference runner of scripts/bench.py: MMRec's own BM3 step, timed by its ``time_bm3.py``.

The script is read at run time from the folder given to ``--mmrec-bm3`` (``../shared/reference/mmrec-bm3`` or a
copy of it; nothing of MMRec is kept in this repository) and runs in a subprocess on the same device, thread count
and train graph, with random features of the same widths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch

from msi.data.dataset import Dataset


def mmrec_bm3(dataset: Dataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MMRec's own BM3 step, timed by ``<args.mmrec_bm3>/time_bm3.py`` in a subprocess on the same device and threads,
    on this data set's train graph with random features of its widths; its JSON, or {"error": ...}."""
    widths = [str(f.shape[1]) for f in dataset.features.values()]
    steps = str(max(args.repeats, 3))
    script = args.mmrec_bm3 / "time_bm3.py"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    inter = dataset.path / f"{dataset.name}.inter"
    cmd = [sys.executable, str(script), str(inter), str(device), steps, *widths]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.mmrec_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"time_bm3.py ran past {args.mmrec_timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"time_bm3.py exit {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def mmrec_ratios(models: dict[str, dict], mmrec: dict[str, Any]) -> dict[str, float]:
    """Our step and epoch over MMRec BM3's (below 1: we are faster), for each of our models measured."""
    if "step_ms" not in mmrec:
        return {}
    out = {}
    for name, row in models.items():
        out[f"{name}_step"] = row["step_ms"] / mmrec["step_ms"]
        out[f"{name}_epoch"] = row["epoch_s"] / mmrec["epoch_s"]
    return out

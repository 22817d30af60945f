"""The MMRec reference runners of scripts/bench.py, each in a subprocess on the same device and thread count.

- ``mmrec_bm3``: MMRec's own BM3 step, timed by its ``time_bm3.py``, read at run time from the folder given to
  ``--mmrec-bm3`` (``../shared/reference/mmrec-bm3`` or a copy), on the same train graph with random features of the
  same widths.
- ``mmrec_model``: any model MMRec has (``MMREC_NAMES``), timed by our ``time_mmrec.py`` through MMRec's own data
  loader, model and trainer, imported from the src/ folder given to ``--mmrec`` (``../shared/reference/mmrec/src``;
  nothing of MMRec is kept in this repository) by the Python given to ``--mmrec-python`` (one with MMRec's
  dependencies, pandas among them), on the same .inter file and the same feature values as our models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from msi.data.dataset import Dataset


MMREC_NAMES = {  # our bench name -> MMRec class
    "bpr": "BPR", "vbpr": "VBPR", "lightgcn": "LightGCN", "bm3": "BM3", "mmgcn": "MMGCN", "grcn": "GRCN",
    "dualgnn": "DualGNN", "lattice": "LATTICE", "freedom": "FREEDOM", "grcn-r0": "GRCN",
}
# MMRec's point where its default is not one that trains: DualGNN's first learning rate, 0.1, gives a NaN loss in its
# first epoch, and MMRec's trainer then ends the epoch at that batch (docs/models.md, dualgnn)
MMREC_POINT = {"dualgnn": ["learning_rate=0.001"]}
USER_GRAPH_FILE = "user_graph_dict.npy"  # DualGNN's user-user graph, which MMRec reads from the data folder
MMREC_FEATURES = ("image_feat.npy", "text_feat.npy")  # MMRec's v_feat and t_feat: our first and second modality
TIME_MMREC = Path(__file__).resolve().parent / "time_mmrec.py"


def _subprocess_json(cmd: list[str], timeout: float, what: str) -> dict[str, Any]:
    """The last JSON line a command prints, with torch's thread count as OMP/MKL threads; or {"error": ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{what} ran past {timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"{what} exit {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def mmrec_model(
    name: str, dataset: Dataset, args: argparse.Namespace, device: torch.device, ks: list[int]
) -> dict[str, Any]:
    """MMRec's own model of our bench model ``name`` at its default point, timed by ``time_mmrec.py`` with our
    evaluation's cut-offs ``ks`` as its topk: its JSON (step_ms, epoch_s, eval_s), or {"error": ...}. MMRec reads
    a data folder: one in a temporary directory holds a link to this data set's .inter file and its first two
    modalities' features, as MMRec's v_feat and t_feat."""
    with tempfile.TemporaryDirectory(prefix="bench-mmrec-") as root:
        folder = Path(root) / dataset.name
        folder.mkdir()
        (folder / f"{dataset.name}.inter").symlink_to((dataset.path / f"{dataset.name}.inter").resolve())
        for file, feats in zip(MMREC_FEATURES, dataset.features.values()):
            np.save(folder / file, feats)
        if name == "dualgnn":
            np.save(folder / USER_GRAPH_FILE, user_graph_dict(dataset.train, dataset.n_users), allow_pickle=True)
        cmd = [str(args.mmrec_python), str(TIME_MMREC), str(args.mmrec), MMREC_NAMES[name], root, dataset.name,
               str(device), str(max(args.repeats, 3)), f"train_batch_size={args.batch_size}", f"seed={args.seed}",
               f"topk=[{','.join(map(str, ks))}]", *MMREC_POINT.get(name, [])]
        return _subprocess_json(cmd, args.mmrec_timeout, f"time_mmrec.py {MMREC_NAMES[name]}")


def user_graph_dict(train: np.ndarray, n_users: int, limit: int = 200) -> dict[int, list[list]]:
    """The user-user graph MMRec's DualGNN reads (its preprocessing writes it before training; its cost is not
    timed): for each user, the users sharing a train item with it, most shared items first, at most ``limit``, as
    {user: [[neighbours], [shared-item counts]]}."""
    pairs = np.unique(train, axis=0)
    r = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
                      shape=(n_users, int(pairs[:, 1].max()) + 1))
    co = (r @ r.T).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    co.sort_indices()
    graph = {}
    for u in range(n_users):
        cols, counts = co.indices[co.indptr[u]:co.indptr[u + 1]], co.data[co.indptr[u]:co.indptr[u + 1]]
        order = np.argsort(-counts, kind="stable")[:limit]
        graph[u] = [cols[order].tolist(), counts[order].tolist()]
    return graph


def mmrec_model_ratios(ours: dict[str, Any], mmrec: dict[str, Any]) -> dict[str, float]:
    """Our step, epoch and evaluation over MMRec's same model's (below 1: we are faster); none when it failed."""
    if "step_ms" not in mmrec:
        return {}
    return {"step": ours["step_ms"] / mmrec["step_ms"], "epoch": ours["epoch_s"] / mmrec["epoch_s"],
            "eval": ours["eval_s"] / mmrec["eval_s"]}


def mmrec_bm3(dataset: Dataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MMRec's own BM3 step, timed by ``<args.mmrec_bm3>/time_bm3.py`` in a subprocess on the same device and threads,
    on this data set's train graph with random features of its widths; its JSON, or {"error": ...}."""
    widths = [str(f.shape[1]) for f in dataset.features.values()]
    steps = str(max(args.repeats, 3))
    inter = dataset.path / f"{dataset.name}.inter"
    cmd = [sys.executable, str(args.mmrec_bm3 / "time_bm3.py"), str(inter), str(device), steps, *widths]
    return _subprocess_json(cmd, args.mmrec_timeout, "time_bm3.py")


def mmrec_ratios(models: dict[str, dict], mmrec: dict[str, Any]) -> dict[str, float]:
    """Our step and epoch over MMRec BM3's (below 1: we are faster), for each of our models measured."""
    if "step_ms" not in mmrec:
        return {}
    out = {}
    for name, row in models.items():
        out[f"{name}_step"] = row["step_ms"] / mmrec["step_ms"]
        out[f"{name}_epoch"] = row["epoch_s"] / mmrec["epoch_s"]
    return out

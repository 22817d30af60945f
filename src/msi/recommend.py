"""Serving: top-k lists for users, seen items excluded, written as TSV with raw ids where mappings exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from msi.console import progress_bar
from msi.data.dataset import Dataset, parse_id
from msi.errors import DataError, MSIError, read_utf8, shown
from msi.evaluate import non_finite_users, seen_masks
from msi.files import check_replace, starts_with, writing
from msi.models import Recommender

MAPPING_FILES = {"userID": "u_id_mapping.csv", "itemID": "i_id_mapping.csv"}
HEADER = "userID\trank\titemID\tscore"
OURS = starts_with(f"{HEADER}\n".encode())  # a file msi-recommend wrote: its header line


def read_id_mapping(path: Path, column: str, size: int) -> np.ndarray | None:
    """MMRec's ``u_id_mapping.csv`` / ``i_id_mapping.csv`` (tab-separated: raw id, index) -> raw id per index.

    Returns None when the file does not exist; a malformed file is a DataError naming it.
    """
    if not path.is_file():
        return None
    lines = read_utf8(path).splitlines()
    header = lines[0].split("\t") if lines else []
    if column not in header or len(header) != 2:
        raise DataError(f"{path}:1: expected two tab-separated columns, one of them '{column}', got {header}")
    col = header.index(column)
    raw = np.empty(size, dtype=object)
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected '<raw id>\\t<{column} below {size}>', got {shown(line)}")
        index, raw_id = parse_id(parts[col], column, f"{path}:{lineno}"), parts[1 - col]
        if index >= size:
            raise DataError(f"{path}:{lineno}: {column} {index} is outside 0..{size - 1}")
        if raw[index] is not None:
            raise DataError(f"{path}:{lineno}: {column} {index} is given a second raw id ({shown(raw_id)} after "
                            f"{shown(raw[index])})")
        raw[index] = raw_id
    missing = np.flatnonzero(raw == None)  # noqa: E711 (elementwise on an object array)
    if len(missing):
        raise DataError(f"{path}: no raw id for {len(missing)} of {size} {column}s (first: {missing[0]})")
    return raw


def select_users(spec: str, dataset: Dataset, split: str) -> np.ndarray:
    """'all' -> every user; 'split' -> users with rows in ``split``; else a file of userIDs, one per line."""
    if spec == "all":
        return np.arange(dataset.n_users)
    if spec == "split":
        return np.unique(dataset.split(split)[:, 0])
    path = Path(spec)
    if not path.is_file():
        raise MSIError(f"--users {shown(spec)}: not 'all', 'split' or an existing file of userIDs")
    users: dict[int, int] = {}  # userID -> its line, in file order
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        u = parse_id(line, "userID", f"{path}:{lineno}")
        if u >= dataset.n_users:
            raise DataError(f"{path}:{lineno}: userID {u} is outside 0..{dataset.n_users - 1}")
        if u in users:  # its rows would be written twice
            raise DataError(f"{path}:{lineno}: userID {u} is listed again (first on line {users[u]})")
        users[u] = lineno
    if not users:
        raise DataError(f"{path}: holds no userIDs (one per line)")
    return np.fromiter(users, dtype=np.int64, count=len(users))


def check_output(out: str | Path) -> None:
    """Refuse an output path holding anything but a recommendations TSV (one that starts with ``HEADER``): a
    checkpoint, a run's results.json, a data file or a folder is never written over (``msi.files``' policy)."""
    check_replace(out, OURS, "msi-recommend")


@torch.no_grad()
def write_recommendations(
    model: Recommender, dataset: Dataset, out: str | Path, users: str = "all", k: int = 20, split: str = "test",
    mask_valid: bool = False, batch_users: int = 4096,
) -> tuple[int, int]:
    """Write ``userID rank itemID score`` rows (rank 1 = best) for the selected users; returns (users, rows).

    A user gets fewer than ``k`` rows when fewer items are candidates. ``out`` must be new or a TSV this function
    wrote (``check_output``). Rows go to a temporary file of a name no other writer picks, renamed over ``out``
    when complete: ``out`` always holds one whole output. NaN or inf scores, or a full disk, are an MSIError that
    leaves ``out`` as it was and no temporary file.
    """
    check_output(out)
    device = model.device
    exclude = seen_masks(dataset, device, mask_valid)[split]
    user_ids = select_users(users, dataset, split)
    raw_u = read_id_mapping(dataset.path / MAPPING_FILES["userID"], "userID", dataset.n_users)
    raw_i = read_id_mapping(dataset.path / MAPPING_FILES["itemID"], "itemID", dataset.n_items)
    emb = model.embeddings()
    n_rows = 0
    with writing(out, OURS, "msi-recommend", what="recommendations") as tmp, open(tmp, "x") as f:
        f.write(HEADER + "\n")
        for start in progress_bar(range(0, len(user_ids), batch_users), desc="recommend", leave=False):
            u = torch.from_numpy(user_ids[start : start + batch_users]).to(device)
            scores, items = model.recommend(u, k, exclude=exclude, emb=emb)
            if non_finite_users(scores):
                raise MSIError(f"the model's scores are NaN or inf (a diverged model): nothing written to {out}")
            n_rows += _write_rows(f, u.cpu().numpy(), items.cpu().numpy(), scores.cpu().numpy(), raw_u, raw_i)
    return len(user_ids), n_rows


def _write_rows(f, users, items, scores, raw_u, raw_i) -> int:
    """Rows for (B,) users and (B, k) items/scores; -inf scores (fewer candidates than k) are left out.

    Returns the number of rows written."""
    B, k = items.shape
    u_col = np.repeat(users, k) if raw_u is None else np.repeat(raw_u[users], k)
    i_col = items.ravel() if raw_i is None else raw_i[items.ravel()]
    ranks = np.tile(np.arange(1, k + 1), B)
    keep = np.isfinite(scores.ravel())
    for u, r, i, s in zip(u_col[keep], ranks[keep], i_col[keep], scores.ravel()[keep]):
        f.write(f"{u}\t{r}\t{i}\t{s:.6g}\n")
    return int(keep.sum())

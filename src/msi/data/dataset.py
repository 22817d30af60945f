"""Reading a data set in the MMRec layout: ``<root>/<name>/<name>.inter`` plus one ``.npy`` per modality.

``.inter`` is tab-separated with a header; required columns ``userID``, ``itemID``, ``x_label`` (any order),
optional ``rating`` and ``timestamp`` (ignored). CRLF line endings are read. ``n_users = max(userID) + 1`` and
``n_items = max(itemID) + 1`` over all splits. Valid/test rows of users without a train row are dropped, as MMRec
does, and counted. Every problem is a :class:`DataError` that names the file (and the line for ``.inter``).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msi.errors import ConfigError, DataError, read_utf8, shown, warn
from msi.files import check_name

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
MIN_ID_LIMIT = 1024  # ids up to max(2 x the distinct count, this) are read; larger ones are taken for a mistake
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # a decimal number, as in a .inter
MAX_EXACT_ID = 2**53  # ids are parsed as float64, exact below this; larger ones (1e30) are refused before int64
SPLIT_LABELS = {"train": 0, "valid": 1, "test": 2}  # split name -> its x_label
INTER_HEADER = "userID\titemID\trating\ttimestamp\tx_label"  # the header msi writes (synth, prepare)


@dataclass
class Dataset:
    """Interactions as int64 arrays of shape (n, 2) holding (user, item) rows, and float32 item features."""

    name: str
    path: Path
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n_items, F_m)
    dropped: dict[str, int] = field(default_factory=dict)  # split -> rows dropped (user has no train row)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLIT_LABELS:
            raise ValueError(f"unknown split {shown(name)}; expected one of {', '.join(SPLIT_LABELS)}")
        return getattr(self, name)

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        feats = ", ".join(f"{m} {f.shape[1]}-d" for m, f in self.features.items()) or "no features"
        return (
            f"{self.name}: {self.n_users} users, {self.n_items} items, train/valid/test "
            f"{len(self.train)}/{len(self.valid)}/{len(self.test)} ({feats}; "
            f"{dropped} valid/test rows of users without train rows dropped)"
        )


def _scan_for_error(path: Path, lines: list[str], cols: list[int]) -> DataError:
    """Slow path, run only when the fast parser failed: find the first bad line and say what is wrong with it."""
    names = REQUIRED_COLUMNS
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) <= max(cols):
            return DataError(f"{path}:{lineno}: expected at least {max(cols) + 1} tab-separated fields, got {len(parts)}")
        for name, c in zip(names, cols):
            raw = parts[c].strip()
            try:
                value = parse_id(raw, name, f"{path}:{lineno}")
            except DataError as e:
                return e
            if name == "x_label" and value not in (0, 1, 2):
                return DataError(f"{path}:{lineno}: x_label {shown(raw)} is not 0 (train), 1 (valid) or 2 (test)")
    return DataError(f"{path}: could not be parsed as a tab-separated .inter file")


def parse_id(raw: str, name: str, where: str) -> int:
    """One id (or other count) read from a text file, by the ``.inter`` reader's rules: a decimal number as numpy
    reads it (not Python's ``1_0``, ``infinity`` or other scripts' digits), whole, not negative, below
    ``MAX_EXACT_ID``; else a DataError that starts with ``where`` (``file:line``)."""
    text = raw.strip()
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not value.is_integer():
        raise DataError(f"{where}: {name} {shown(raw)} is not an integer")
    if value < 0:
        raise DataError(f"{where}: {name} {shown(raw)} is negative")
    if value >= MAX_EXACT_ID:
        raise DataError(f"{where}: {name} {shown(raw)} is far out of range: MMRec's layout numbers ids from 0 "
                        "without large gaps (msi-data prepare writes such ids)")
    return int(value)


def read_inter(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``.inter`` -> (users, items, x_label), each an int64 array of shape (n,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: interaction file not found")
    text = read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")  # CRLF read as LF; a UTF-8 BOM is dropped
    lines = text.split("\n")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} in header {header}")
    cols = [header.index(c) for c in REQUIRED_COLUMNS]
    if not any(line.strip() for line in lines[1:]):  # no rows: loadtxt would warn before the error about it
        return tuple(np.empty(0, dtype=np.int64) for _ in range(3))
    try:
        arr = np.loadtxt(io.StringIO(text), delimiter="\t", skiprows=1, usecols=cols, dtype=np.float64, ndmin=2)
    except ValueError:
        raise _scan_for_error(path, lines, cols) from None
    ok = (np.all(arr >= 0) and np.all(arr < MAX_EXACT_ID) and np.all(arr == np.floor(arr))  # inf, nan: not ok
          and np.all(np.isin(arr[:, 2], (0, 1, 2))))
    if not ok:
        raise _scan_for_error(path, lines, cols)
    ids = arr.astype(np.int64)
    for c, name in enumerate(REQUIRED_COLUMNS[:2]):
        _check_id_range(path, lines, ids[:, c], name)
    return ids[:, 0], ids[:, 1], ids[:, 2]


def _check_id_range(path: Path, lines: list[str], ids: np.ndarray, name: str) -> None:
    """An id far above the number of distinct ids (99999999 among 60 users) would size the model by it: refuse."""
    if len(ids) == 0:
        return
    n_distinct = len(np.unique(ids))
    limit = max(2 * n_distinct, MIN_ID_LIMIT)
    if ids.max() < limit:
        return
    row = int(np.argmax(ids >= limit))
    lineno = [i for i, line in enumerate(lines[1:], start=2) if line.strip()][row]
    raise DataError(
        f"{path}:{lineno}: {name} {ids[row]} is far out of range ({n_distinct} distinct {name}s; ids from {limit} "
        "on are refused): MMRec's layout numbers ids from 0 without large gaps (msi-data prepare writes such ids)"
    )


def load_features(path: str | Path, n_items: int) -> np.ndarray:
    """Read an item-feature matrix (n_items, F) as float32; wrong shape or non-finite values are errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    try:  # memory-mapped: a header promising more than the file holds is an error here, not a huge allocation
        feat = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "the file is shorter than its header's shape says" if "greater than file size" in str(e) else e
        raise DataError(f"{path}: not a readable .npy array ({why})") from None
    if feat.ndim != 2 or feat.shape[1] == 0:
        raise DataError(f"{path}: expected a 2-d array (n_items, dim >= 1), got shape {feat.shape}")
    if feat.shape[0] != n_items:
        raise DataError(f"{path}: has {feat.shape[0]} rows but the data set has {n_items} items (row r = itemID r)")
    if not np.issubdtype(feat.dtype, np.floating) and not np.issubdtype(feat.dtype, np.integer):
        raise DataError(f"{path}: dtype {feat.dtype} is not numeric")
    bad = ~np.isfinite(feat).all(axis=1)  # before the cast, which turns float64 beyond float32's range into inf
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{path}: {len(rows)} row(s) hold NaN or inf values (first: row {rows[0]})")
    if feat.dtype.itemsize > 4 and np.issubdtype(feat.dtype, np.floating):
        huge = (np.abs(feat) > np.finfo(np.float32).max).any(axis=1)
        if huge.any():
            rows = np.flatnonzero(huge)
            raise DataError(f"{path}: {len(rows)} row(s) hold values beyond float32's range of ±3.4e38 (first: row "
                            f"{rows[0]}, {feat[rows[0]][np.argmax(np.abs(feat[rows[0]]))]:.3g})")
    return np.array(feat, dtype=np.float32, order="C")  # a copy: nothing stays mapped to the file


def check_data_set_name(name: str) -> None:
    """A data set's name is the folder ``<root>/<name>/`` and its ``<name>.inter``: a plain folder name, no path."""
    check_name(name, "data set name", ConfigError)


def load_dataset(root: str | Path, name: str, modalities: dict[str, str] | None = None) -> Dataset:
    """Read ``<root>/<name>/<name>.inter`` and the feature file of each modality (ordered name -> file)."""
    folder = Path(root) / name
    inter_path = folder / f"{name}.inter"
    if not inter_path.is_file():
        found = sorted(p.name for p in Path(root).glob("*") if (p / f"{p.name}.inter").is_file())
        raise DataError(f"{inter_path} does not exist; data sets in {root}: {', '.join(found) or 'none'} (for "
                        "MMRec's Amazon sets see the README's 'Using MMRec's data': data.root=PATH)")
    users, items, labels = read_inter(inter_path)
    if len(users) == 0:
        raise DataError(f"{inter_path}: the train split (x_label 0) is empty: the file holds no rows after its header")
    if not np.any(labels == 0):
        raise DataError(f"{inter_path}: the train split (x_label 0) is empty")
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    has_train = np.zeros(n_users, dtype=bool)
    has_train[users[labels == 0]] = True
    splits, dropped = {}, {}
    for split, label in SPLIT_LABELS.items():
        rows = labels == label
        keep = rows & has_train[users]
        dropped[split] = int(rows.sum() - keep.sum())
        splits[split] = np.stack([users[keep], items[keep]], axis=1)
    _warn_repeated_pairs(inter_path, splits, n_items)
    features = {m: load_features(folder / file, n_items) for m, file in (modalities or {}).items()}
    return Dataset(name, folder, n_users, n_items, features=features, dropped=dropped, **splits)


def _warn_repeated_pairs(path: Path, splits: dict[str, np.ndarray], n_items: int) -> None:
    """Warn when a (user, item) pair is on several rows: within a split it counts twice; a valid or test row whose
    pair is also a train row can never be hit (train items are masked when scoring)."""
    keys = {split: rows[:, 0] * n_items + rows[:, 1] for split, rows in splits.items()}  # (n,) one key per pair
    within = {split: len(k) - len(np.unique(k)) for split, k in keys.items()}
    in_train = {split: int(np.isin(keys[split], keys["train"]).sum()) for split in ("valid", "test")}
    found = [f"{n} extra row(s) within {split}" for split, n in within.items() if n]
    found += [f"{n} {split} row(s) whose pair is also in train" for split, n in in_train.items() if n]
    if found:
        why = " (train items are masked when scoring, so those rows are never hit)" if any(in_train.values()) else ""
        warn(f"{path}: repeated (userID, itemID) pairs: {', '.join(found)}{why}")

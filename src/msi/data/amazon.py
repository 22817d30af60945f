"""Streaming readers for the public Amazon review releases (2014 and 2018), plain or gzip.

One line is one record. Each line is parsed as JSON first and, when that fails, as a Python dict literal with
`ast.literal_eval` (never `eval`): the 2014 metadata is written that way, everything else is JSON. So one reader
serves both releases without a format option. A line that is neither, or lacks a field, raises `DataError`
naming the file and line; with `skip_bad_lines` such lines are counted in a `SkipLog` instead.

Image features come from the 2014 `.b` files: records of a 10-byte ASIN followed by 4096 little-endian float32.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from msi.console import progress_bar
from msi.errors import DataError, shown

IMAGE_DIM = 4096
IMAGE_RECORD = np.dtype([("asin", "S10"), ("feat", "<f4", (IMAGE_DIM,))])

# An `asin` field in a JSON or Python-literal line: "asin": "B00..." or 'asin': 'B00...'.
_ASIN_FIELD = re.compile(rb"""["']asin["']\s*:\s*["']([^"'\\]+)["']""")

T = TypeVar("T")


class _Malformed(Exception):
    """A line that cannot be used; the reader adds the file and line number."""


@dataclass
class SkipLog:
    """Lines skipped under `skip_bad_lines`: how many, and the first one's message (for the summary)."""

    count: int = 0
    first: str | None = None

    def add(self, message: str) -> None:
        self.count += 1
        self.first = self.first or message


@dataclass
class Reviews:
    """Interactions as read, one entry per usable review line, in file order.

    `users[r]` / `items[r]` are codes into `user_ids` / `item_ids`, assigned in order of first appearance.
    """

    users: np.ndarray  # (R,) int64
    items: np.ndarray  # (R,) int64
    ratings: np.ndarray  # (R,) float64
    timestamps: np.ndarray  # (R,) int64
    user_ids: list[str]
    item_ids: list[str]
    skipped: SkipLog = field(default_factory=SkipLog)


def is_gzip(path: Path) -> bool:
    """Whether `path` starts with the gzip magic number (the name's suffix is not trusted)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> IO[bytes]:
    """Open `path` for reading bytes, decompressing gzip."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def parse_line(line: bytes) -> dict[str, Any]:
    """One record from one line: JSON, else a Python dict literal (2014 metadata)."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise _Malformed("neither JSON nor a Python dict literal") from None
    if not isinstance(record, dict):
        raise _Malformed(f"expected a record {{...}}, got {type(record).__name__}")
    return record


def iter_records(
    path: Path, convert: Callable[[dict[str, Any]], T], skip: SkipLog | None, desc: str, progress: bool,
    pass_over: Callable[[bytes], bool] | None = None,
) -> Iterator[T]:
    """Yield `convert(record)` for each non-blank line of `path`, streamed.

    A line that fails to parse or convert raises `DataError` ("file:line: why"), or is counted in `skip` when
    one is given. Lines for which `pass_over(line)` is true are not parsed at all.
    """
    with open_binary(path) as f:
        lines = progress_bar(f, desc=desc, unit=" lines", show=progress, mininterval=1.0)
        line_no = 0
        try:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip() or (pass_over is not None and pass_over(line)):
                    continue
                try:
                    yield convert(parse_line(line))
                except _Malformed as err:
                    message = f"{path}:{line_no}: {err}"
                    if skip is None:
                        raise DataError(message + " (--skip-bad-lines skips such lines)") from None
                    skip.add(message)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: unreadable after line {line_no}: {err}") from None
        finally:
            lines.close()


def _raw_id(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value or not value.isprintable():
        raise _Malformed(f"field {shown(key)} must be a non-empty id without control characters, got {shown(value)}")
    return value


def _review(record: dict[str, Any]) -> tuple[str, str, float, int]:
    """(reviewerID, asin, overall, unixReviewTime) of one review record; both releases use these names."""
    rating, stamp = record.get("overall"), record.get("unixReviewTime")
    if not isinstance(rating, (int, float)) or isinstance(rating, bool):
        raise _Malformed(f"field 'overall' must be a number, got {shown(rating)}")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        raise _Malformed(f"field 'unixReviewTime' must be an integer, got {shown(stamp)}")
    return _raw_id(record, "reviewerID"), _raw_id(record, "asin"), float(rating), stamp


def read_reviews(path: Path, *, skip_bad_lines: bool = False, progress: bool = True) -> Reviews:
    """Read a reviews file (2014 or 2018 JSON lines) in one streamed pass, keeping four numbers per review."""
    users, items, stamps, ratings = array("q"), array("q"), array("q"), array("d")
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    skipped = SkipLog()
    for user, item, rating, stamp in iter_records(
        path, _review, skipped if skip_bad_lines else None, "reading reviews", progress
    ):
        users.append(user_code.setdefault(user, len(user_code)))
        items.append(item_code.setdefault(item, len(item_code)))
        ratings.append(rating)
        stamps.append(stamp)
    if not users:
        raise DataError(f"{path}: no reviews in the file")
    return Reviews(
        users=np.frombuffer(users, dtype=np.int64),
        items=np.frombuffer(items, dtype=np.int64),
        ratings=np.frombuffer(ratings, dtype=np.float64),
        timestamps=np.frombuffer(stamps, dtype=np.int64),
        user_ids=list(user_code),
        item_ids=list(item_code),
        skipped=skipped,
    )


def _text(record: dict[str, Any], key: str) -> str:
    """A text field: a string, or a list of strings (2018 `description`) joined with spaces."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise _Malformed(f"field {shown(key)} must be text or a list of text, got {type(value).__name__}")


def first_category_path(record: dict[str, Any]) -> list[str]:
    """The first category path: 2014 `categories` is a list of paths, 2018 `category` is one path."""
    paths = record.get("categories")
    if paths is None:
        path = record.get("category") or []
    elif isinstance(paths, list) and paths and isinstance(paths[0], list):
        path = paths[0]
    else:
        path = paths
    if not isinstance(path, list) or not all(isinstance(c, str) for c in path):
        raise _Malformed("field 'categories'/'category' must be a list of category paths or one path")
    return path


def item_text(record: dict[str, Any]) -> str:
    """title + brand + first category path + description, joined by spaces, whitespace runs collapsed."""
    parts = [_text(record, "title"), _text(record, "brand"), " ".join(first_category_path(record))]
    parts.append(_text(record, "description"))
    return " ".join(" ".join(parts).split())


def read_item_texts(
    path: Path, item_index: dict[str, int], *, skip_bad_lines: bool = False, progress: bool = True
) -> tuple[list[str], SkipLog]:
    """Text of each wanted item from a metadata file (2014 Python literals or 2018 JSON), in one pass.

    `item_index` maps ASIN -> row. Returns `texts` with `texts[row]` the item's text ("" when the item has no
    record or an empty one; the first record of an ASIN wins) and the skipped-line log. A line whose `asin`
    fields, found by a text search, are all unwanted is passed over unparsed: a Python-literal line costs ~0.2 ms
    to parse, and a category's metadata file lists many more items than survive the k-core.
    """
    wanted = {asin.encode() for asin in item_index}

    def unwanted(line: bytes) -> bool:
        found = _ASIN_FIELD.findall(line)
        return bool(found) and not any(asin in wanted for asin in found)

    texts = [""] * len(item_index)
    seen = np.zeros(len(item_index), dtype=bool)
    skipped = SkipLog()

    def convert(record: dict[str, Any]) -> tuple[int | None, str]:
        row = item_index.get(_raw_id(record, "asin"))
        return row, item_text(record)

    skip = skipped if skip_bad_lines else None
    for row, text in iter_records(path, convert, skip, "reading metadata", progress, pass_over=unwanted):
        if row is not None and not seen[row]:
            texts[row], seen[row] = text, True
    return texts, skipped


def read_image_features(
    path: Path, item_index: dict[str, int], *, chunk_records: int = 2048, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Image vectors of the wanted items from a `.b` file (plain or gzip), read once in chunks.

    Returns `features` (n_items, 4096) float32, zero where an item has no record, and `found` (n_items,) bool.
    The first record of an ASIN wins. Memory stays at n_items x 4096 floats plus one chunk, whatever the file size.
    """
    wanted = {asin.encode("ascii", "replace"): row for asin, row in item_index.items()}
    features = np.zeros((len(item_index), IMAGE_DIM), dtype=np.float32)
    found = np.zeros(len(item_index), dtype=bool)
    total = None if is_gzip(path) else path.stat().st_size // IMAGE_RECORD.itemsize
    with open_binary(path) as f, progress_bar(
        total=total, desc="reading images", unit=" records", show=progress, mininterval=1.0
    ) as bar:
        start = 0
        while chunk := _read_chunk(f, path, start, chunk_records):
            records = np.frombuffer(chunk, dtype=IMAGE_RECORD)
            for offset, asin in enumerate(records["asin"].tolist()):
                row = wanted.get(asin)
                if row is not None and not found[row]:
                    features[row] = _finite(records["feat"][offset], path, start + offset)
                    found[row] = True
            start += len(records)
            bar.update(len(records))
    return features, found


def _read_chunk(f: IO[bytes], path: Path, start: int, count: int) -> bytes:
    """Up to `count` whole records of bytes; a partial record at the end of the file is an error."""
    try:
        chunk = f.read(count * IMAGE_RECORD.itemsize)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable at image record {start}: {err}") from None
    if len(chunk) % IMAGE_RECORD.itemsize:
        raise DataError(
            f"{path}: ends inside image record {start + len(chunk) // IMAGE_RECORD.itemsize}; a .b file holds "
            f"{IMAGE_RECORD.itemsize}-byte records (10-byte ASIN + {IMAGE_DIM} float32), so it is truncated or "
            "not a .b file"
        )
    return chunk


def _finite(vector: np.ndarray, path: Path, record: int) -> np.ndarray:
    if not np.isfinite(vector).all():
        raise DataError(f"{path}: image record {record} holds NaN or inf values")
    return vector

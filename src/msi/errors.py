"""Errors that the command-line tools report as one line, without a traceback; warnings; the one text reader."""

from __future__ import annotations

import sys
from pathlib import Path


class MSIError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(MSIError):
    """A configuration file or override is wrong: an unknown key, a bad value."""


class DataError(MSIError):
    """A data file is missing or malformed. The message names the file (and line where there is one)."""


class CheckpointError(MSIError):
    """A checkpoint is missing, truncated, unsafe, or belongs to another data set."""


class Interrupted(MSIError):
    """Ctrl-C: the tools exit with status 130 (not 2) after saying what was kept."""


def read_utf8(path: str | Path, error: type[MSIError] = DataError) -> str:
    """The text of ``path`` (a UTF-8 BOM dropped); bytes that are not UTF-8 are an ``error`` naming file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start})") from None


def shown(value: object, limit: int = 200) -> str:
    """``value``'s repr cut to ``limit`` characters: an error line quoting it stays short whatever it holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def raised(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception someone else's code raised, on one line and cut to ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def warn(message: str) -> None:
    """A ``warning: ...`` line on stderr: something the user should know that does not stop the run."""
    print(f"warning: {message}", file=sys.stderr)

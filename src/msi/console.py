"""Progress bars: drawn only when asked for and only on a terminal, so piped or redirected output (CI, ``| tee``,
``> log 2>&1``) holds the tools' lines without bars."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` that draws when ``show`` and its stream (stderr) is a terminal (tqdm's
    ``disable=None``); otherwise a plain pass over ``iterable``."""
    return tqdm(iterable, disable=None if show else True, **kwargs)

"""The N grid points of a screening sweep best on valid, one line each as the --set overrides that make the point.

    python scripts/table2_top.py SCREEN_DIR [N] [CONFIG]

SCREEN_DIR is an msi-sweep folder whose tables ``msi-sweep --report`` wrote (summary.json). Only eligible points
(every seed finished) count, ranked by their mean valid selection metric, ties in grid order, as msi.select ranks
them; test is not read. CONFIG (a config's file name without .yaml) picks the table row when the folder has
several. scripts/table2.sh runs each printed point with three seeds (its "confirm" part).
"""

from __future__ import annotations

import sys
from pathlib import Path

from msi.errors import MSIError
from msi.select import read_summary


def top_points(screen: Path, n: int = 2, config: str | None = None) -> list[list[str]]:
    """The ``n`` eligible points of ``screen``'s summary.json best on mean valid, each a list of key=value."""
    summary = read_summary(screen)
    if summary is None:
        raise MSIError(f"{screen}: no summary.json of msi-sweep (run msi-sweep --report {screen} first)")
    rows = summary["configs"]
    if config is None and len(rows) != 1:
        raise MSIError(f"{screen}: holds the configs {', '.join(rows)}; name one")
    name = config if config is not None else next(iter(rows))
    if name not in rows:
        raise MSIError(f"{screen}: no config {name!r} (it has {', '.join(rows)})")
    grid = [g for g in rows[name]["grid"] if g["eligible"]]
    grid.sort(key=lambda g: -g["valid"]["mean"])  # stable: equals keep grid order
    return [g["point"] for g in grid[:n]]


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        n = int(argv[1]) if len(argv) > 1 else 2
        for point in top_points(Path(argv[0]), n, argv[2] if len(argv) > 2 else None):
            print(" ".join(point))
    except (MSIError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

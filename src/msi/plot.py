"""msi-plot: learning curves of run directories, or the grid of a sweep, as a PNG (matplotlib, Agg backend).

Runs: one panel for the valid ``train.metric`` and one per loss term (the keys the trainer writes before ``epoch``
in a metrics.jsonl row; diagnostics after it are left out), against the epoch; the seeds of one
configuration are thin lines, their mean a thick one. Sweep: one panel per config with the mean valid metric of
every grid point (a heat map for two axes, lines otherwise), the point selected on valid marked with a star.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from msi.errors import MSIError
from msi.select import SWEEP_FILE, grid_points, load_sweep, split_values, summarize

PANEL = (4.0, 3.0)  # inches per panel
DPI = 100


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MSIError("msi-plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(dirs: list[Path], out: Path) -> tuple[int, int]:
    """A sweep folder (with sweep.yaml) or run directories -> ``out``; returns the PNG's (width, height)."""
    dirs = [Path(d) for d in dirs]
    if len(dirs) == 1 and (dirs[0] / SWEEP_FILE).is_file():
        return plot_sweep(dirs[0], Path(out))
    return plot_runs(dirs, Path(out))


def _figure(n_panels: int) -> tuple[Any, list[Any]]:
    plt = pyplot()
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), dpi=DPI, squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Any, out: Path) -> tuple[int, int]:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the size is panels x PANEL x DPI
    size = fig.canvas.get_width_height()
    pyplot().close(fig)
    return size


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The saved config (a plain dict) and the metric rows of a run directory."""
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise MSIError(f"{run_dir / name}: not found; msi-plot takes run directories or a sweep folder")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return yaml.safe_load((run_dir / "config.yaml").read_text()), rows


def plot_runs(run_dirs: list[Path], out: Path) -> tuple[int, int]:
    """Valid metric and every loss term against the epoch; runs differing only in seed share a colour and a mean."""
    groups: dict[str, list[tuple[str, list[dict]]]] = {}
    metric = None
    for d in run_dirs:
        cfg, rows = read_run(d)
        metric = metric or cfg["train"]["metric"]
        key = json.dumps({s: {k: v for k, v in sec.items() if k not in ("seed", "run_name", "out_dir")}
                          for s, sec in cfg.items()}, sort_keys=True)
        groups.setdefault(key, []).append((re.sub(r"_s\d+$", "", d.name), rows))
    terms = list(dict.fromkeys(k for g in groups.values() for _, rows in g for r in rows for k in loss_terms(r)))
    quantities = [f"valid {metric}", *terms]
    fig, axes = _figure(len(quantities))
    for color, runs in enumerate(groups.values()):
        for ax, q in zip(axes, quantities):
            curves = [_curve(rows, q, metric) for _, rows in runs]
            for x, y in curves:
                ax.plot(x, y, color=f"C{color}", alpha=0.35, linewidth=0.8)
            x, y = _mean_curve(curves)
            ax.plot(x, y, color=f"C{color}", linewidth=2, label=f"{runs[0][0]} (mean of {len(runs)})")
    for ax, q in zip(axes, quantities):
        ax.set(title=q, xlabel="epoch")
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def loss_terms(row: dict[str, Any]) -> list[str]:
    """The loss terms of a metrics row: its keys before ``epoch`` (the trainer writes them first)."""
    keys = list(row)
    return keys[: keys.index("epoch")] if "epoch" in keys else []


def _curve(rows: list[dict], quantity: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if quantity.startswith("valid "):
        pts = [(r["epoch"], r["valid"][metric]) for r in rows if "valid" in r]
    else:
        pts = [(r["epoch"], r[quantity]) for r in rows if quantity in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over the epochs every seed reached (early stopping ends seeds at different epochs)."""
    n = min(len(x) for x, _ in curves)
    return curves[0][0][:n], np.mean([y[:n] for _, y in curves], axis=0)


def plot_sweep(sweep_dir: Path, out: Path) -> tuple[int, int]:
    """Mean valid metric per grid point, one panel per config; the selected point is starred."""
    record, trials, cfgs = load_sweep(sweep_dir)
    configs = summarize(trials, {name: cfg.train.metric for name, cfg in cfgs.items()})
    axes_values = [(item.partition("=")[0].strip(), split_values(item.partition("=")[2])) for item in record["grid"]]
    fig, axes = _figure(len(configs))
    for ax, (name, c) in zip(axes, configs.items()):
        means = {tuple(g["point"]): g["valid"]["mean"] if g["eligible"] else np.nan for g in c["grid"]}
        chosen = tuple(c["selected"]["point"]) if c["selected"] else None
        if len(axes_values) == 2:
            _heat_map(ax, fig, axes_values, means, chosen)
        else:
            _lines(ax, axes_values, means, chosen)
        ax.set_title(f"{name}: mean valid {c['metric']}", fontsize=9)
    return _save(fig, out)


def _heat_map(ax: Any, fig: Any, axes_values: list, means: dict, chosen: tuple | None) -> None:
    (k0, v0), (k1, v1) = axes_values
    grid = np.array([[means[(f"{k0}={a}", f"{k1}={b}")] for b in v1] for a in v0], dtype=float)
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    for i, j in np.ndindex(grid.shape):
        ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.4f}", ha="center", va="center",
                color="white", fontsize=8)
        if chosen == (f"{k0}={v0[i]}", f"{k1}={v1[j]}"):
            ax.plot(j, i - 0.3, marker="*", color="red", markersize=14, label="selected")
    ax.set(xticks=range(len(v1)), xticklabels=v1, xlabel=k1, yticks=range(len(v0)), yticklabels=v0, ylabel=k0)


def _lines(ax: Any, axes_values: list, means: dict, chosen: tuple | None) -> None:
    """x: the first axis' values; one line per combination of the other axes (none: a single line)."""
    k0, v0 = axes_values[0] if axes_values else ("point", [""])
    for rest in grid_points([f"{k}={','.join(v)}" for k, v in axes_values[1:]]):
        points = [tuple(p for p in (f"{k0}={a}" if axes_values else None, *rest) if p) for a in v0]
        ax.plot(range(len(v0)), [means[p] for p in points], marker="o", label=" ".join(rest) or None)
        for x, p in enumerate(points):
            if p == chosen:
                ax.plot(x, means[p], marker="*", color="red", markersize=14, linestyle="none")
    ax.set(xticks=range(len(v0)), xticklabels=v0, xlabel=k0, ylabel="mean valid")
    if len(axes_values) > 1:
        ax.legend(fontsize=7)

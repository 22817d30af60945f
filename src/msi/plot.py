"""msi-plot: learning curves of run directories, or the grid of a sweep, as a PNG, PDF or SVG (matplotlib, Agg).

Runs (``runs_figure``): one panel for the valid ``train.metric`` and one per loss term (the terms each
metrics.jsonl row names; diagnostics are left out), against whole-number epochs. Runs whose configs differ only in
the seed form one group: its seeds are thin lines, their mean over the epochs every seed reached a thick one
("mean of n", drawn only when n > 1). Labels are short: ``seed 42`` within one group; between groups the config
keys that tell them apart (``model.dropout=0.5``), or, when more than three keys differ, the part of the run
directory names that differs. Each run's best epoch (the first with the best valid metric, as the trainer selects)
is marked on every panel. The legend sits below the panels, never on them.

Sweep (``sweep_figure``): one panel per config of the valid metric at every grid point, mean ± sample std over the
seeds, with n said in the title and the legend; the point selected on valid is starred; a point whose seeds have not
all finished is left out (the title counts them). Two grid keys: a heat map, each cell "mean", "± std", "n=2" on
three lines (the figure grows with the grid), rows and columns in numeric order where the values are numbers (a heat
map's cells are categories: evenly spaced). Otherwise lines with error bars over the first key, one line per
combination of the others, on a numeric x axis: linear, or logarithmic when the positive values span a decade or
more (alpha, beta); when 0 is among them, symmetric-log with its linear part reaching the smallest positive value,
so 0 sits one decade left of it. Non-numeric values (``eval.ks=[10,20]``) are categories in grid order. Line
panels share one y-range and draw the popularity floor of their data set (dashed) when the sweep's summary.json
holds it; a heat map gives it in the title.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from msi.config import Config, settings
from msi.errors import MSIError, shown, warn
from msi.files import check_replace, writing
from msi.rundir import CONFIG, METRICS, finite, improves, loss_terms, read_config, read_metrics
from msi.select import load_sweep, read_summary, summarize
from msi.sweepdir import SWEEP_FILE, grid_points, split_values

FORMATS = ("png", "pdf", "svg")
PANEL = (4.0, 3.0)  # inches per panel
LEGEND = (0.15, 0.2)  # inches below the panels for the legend: a margin, and one row of 8 pt text
DPI = 100
MARK = "written by msi-plot"  # in every picture's metadata: a file holding it may be replaced
MAX_PICTURE = 64 * 2**20  # bytes of a file read to find MARK: msi-plot's pictures are far smaller
TITLES = {
    "loss": "loss: the total minimised",
    "nce": "nce: InfoNCE estimate of I(z^a; z^b)\n(higher = more shared)",
    "jsd": "jsd: JSD estimate of I(z^a; z^b)\n(higher = more shared)",
}


def plot(dirs: list[Path], out: Path, overwrite: bool = False) -> tuple[int, int]:
    """A sweep folder (with sweep.yaml) or run directories -> the file ``out``; returns its (width, height) in
    pixels at ``DPI``. ``out`` must end in .png, .pdf or .svg, and be new or a picture msi-plot wrote (``ours``)
    unless ``overwrite``."""
    out = Path(out)
    if out.suffix.lower().lstrip(".") not in FORMATS:
        what = f"unsupported extension {shown(out.suffix)}" if out.suffix else "no extension"
        raise MSIError(f"{out}: {what}; msi-plot writes {', '.join('.' + f for f in FORMATS)}: end the name in one")
    check_replace(out, ours, "msi-plot", "--overwrite", overwrite)  # before the inputs are read
    dirs = [Path(d) for d in dirs]
    is_sweep = len(dirs) == 1 and (dirs[0] / SWEEP_FILE).is_file()
    fig = sweep_figure(dirs[0]) if is_sweep else runs_figure(dirs)
    fmt = out.suffix.lower().lstrip(".")
    with writing(out, ours, "msi-plot", "--overwrite", overwrite, what="picture") as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata={"Software" if fmt == "png" else "Creator": MARK})
    width, height = fig.get_size_inches() * DPI
    return round(width), round(height)


def ours(path: Path) -> bool:
    """Whether ``path`` is a picture msi-plot wrote: its metadata (PNG Software, SVG and PDF Creator) holds ``MARK``."""
    try:
        with open(path, "rb") as f:
            return MARK.encode() in f.read(MAX_PICTURE)
    except OSError:
        return False


def require_matplotlib() -> None:
    """A one-line MSIError naming the extra when matplotlib is not installed (called before any matplotlib import)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise MSIError("msi-plot needs matplotlib: pip install -e '.[plot]'") from None


def new_figure(n_panels: int, legend_rows: int, panel: tuple[float, float] = PANEL) -> tuple[Any, list[Any]]:
    """A Figure (no pyplot state) of ``n_panels`` panels of ``panel`` inches, three a row, with room for legend rows
    below."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + _legend_height(legend_rows)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _legend_height(rows: int) -> float:
    return LEGEND[0] + LEGEND[1] * rows if rows else 0.0


def _legend_columns(labels: list[str], width: float) -> int:
    entry = max(0.7 + 0.07 * len(label) for label in labels)  # inches: the handle and ~8 pt characters
    return max(1, min(len(labels), int(width // entry)))


def _finish(fig: Any, handles: list[Any], labels: list[str], ncol: int) -> Any:
    """Lay the panels out above the legend rows and put the legend there."""
    below = _legend_height(math.ceil(len(labels) / ncol)) / fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, below, 1, 1))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0), ncol=ncol, fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- learning curves


def read_run(run_dir: Path) -> tuple[Config, list[dict[str, Any]]]:
    """The saved config and the complete metric rows of a run directory (a partial last line is skipped)."""
    if not (run_dir / CONFIG).is_file():
        raise MSIError(f"{run_dir / CONFIG}: not found; msi-plot takes run directories or a sweep folder")
    rows = read_metrics(run_dir)
    if not rows:
        raise MSIError(f"{run_dir / METRICS}: no complete epoch yet; nothing to plot")
    cfg = read_config(run_dir)
    metric = cfg.train.metric
    bad = [r["epoch"] for r in rows if metric in _valid(r) and not finite(_valid(r)[metric])]
    if bad:
        shown_epochs = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warn(f"{run_dir / METRICS}: valid {metric} is not a finite number at epoch(s) {shown_epochs}; left out of "
             "the curve (the trainer never selects such an epoch)")
    return cfg, rows


def _group_labels(groups: list[list[tuple[Path, Config, list]]]) -> list[str]:
    """What tells each group apart: ``key=value, ...`` over the keys that differ, or the differing part of the
    run directory names when more than three keys differ."""
    each = [settings(g[0][1]) for g in groups]
    differ = [k for k in dict.fromkeys(k for s in each for k in s) if len({s.get(k) for s in each}) > 1]
    if len(differ) <= 3:
        return [", ".join(f"{k}={s.get(k, '-')}" for k in differ) for s in each]
    parts = [re.sub(r"_s\d+$", "", g[0][0].name).split("_") for g in groups]
    for end in (0, -1):  # drop the leading, then the trailing parts every name shares
        while all(len(p) > 1 for p in parts) and len({p[end] for p in parts}) == 1:
            parts = [p[1:] if end == 0 else p[:-1] for p in parts]
    return ["_".join(p) for p in parts]


def _series(groups: list[list[tuple[Path, Config, list]]]) -> list[tuple[str, str, list[list], bool, bool]]:
    """What to draw: (label, colour, the runs' rows, draw each run, draw their mean). One group: each seed in its
    own colour, then the mean in black; several: one colour a group, its seeds thin under a thick mean."""
    if len(groups) == 1:
        runs = groups[0]
        out = [(f"seed {cfg.train.seed}", f"C{j}", [rows], True, False) for j, (_, cfg, rows) in enumerate(runs)]
        return out + ([(f"mean of {len(runs)}", "black", [rows for *_, rows in runs], False, True)]
                      if len(runs) > 1 else [])
    out = []
    for i, (runs, label) in enumerate(zip(groups, _group_labels(groups))):
        n = f"seed {runs[0][1].train.seed}" if len(runs) == 1 else f"mean of {len(runs)}"
        out.append((f"{label} ({n})", f"C{i}", [rows for *_, rows in runs], True, len(runs) > 1))
    return out


def runs_figure(run_dirs: list[Path]) -> Any:
    """Valid metric and every loss term against the epoch (see the module doc); returns the Figure."""
    groups: dict[str, list[tuple[Path, Config, list]]] = {}
    for d in run_dirs:  # the inputs are read and checked first: a bad run is named also without matplotlib
        cfg, rows = read_run(Path(d))
        groups.setdefault(json.dumps(settings(cfg), sort_keys=True), []).append((Path(d), cfg, rows))
    require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    metric = next(iter(groups.values()))[0][1].train.metric
    terms = list(dict.fromkeys(t for g in groups.values() for *_, rows in g for r in rows for t in loss_terms(r)))
    quantities = [f"valid {metric}", *terms]
    series = _series(list(groups.values()))
    names = [s[0] for s in series] + ["best epoch (valid)"]
    ncol = _legend_columns(names, PANEL[0] * min(3, len(quantities)))
    fig, axes = new_figure(len(quantities), math.ceil(len(names) / ncol))
    legend: list[Any] = []
    for ax, q in zip(axes, quantities):
        handles = [_draw(ax, q, metric, *s[1:]) for s in series]
        ax.set_title(TITLES.get(q, f"{q} (higher is better)" if q.startswith("valid ") else q), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        legend = legend or handles
    legend.append(Line2D([], [], marker="v", color="gray", markeredgecolor="black", linestyle="none"))
    return _finish(fig, legend, names, ncol)


def _draw(ax: Any, quantity: str, metric: str, colour: str, runs: list[list], each: bool, mean: bool) -> Any:
    """One series on one panel, each run's best epoch marked; returns the line that stands for it in the legend."""
    line = None
    if each:
        for rows in runs:
            x, y = _curve(rows, quantity, metric)
            line = ax.plot(x, y, color=colour, linewidth=0.8 if mean else 1.5, alpha=0.45 if mean else 1)[0]
            best = best_epoch(rows, metric)
            if best is not None and best in x:
                ax.plot(best, y[list(x).index(best)], marker="v", color=colour, markeredgecolor="black",
                        markersize=7, linestyle="none", gid="best-epoch", zorder=5)
    if mean:
        line = ax.plot(*_mean_curve([_curve(r, quantity, metric) for r in runs]), color=colour, linewidth=2.2)[0]
    return line


def best_epoch(rows: list[dict[str, Any]], metric: str) -> int | None:
    """The epoch the trainer selects (``msi.rundir.improves``: the first with the best valid ``metric``; NaN never
    is); None before any evaluation, or when no valid metric was a number."""
    best, epoch = -math.inf, None
    for r in rows:
        value = _valid(r).get(metric)
        if improves(value, best):
            best, epoch = value, r["epoch"]
    return epoch


def _valid(row: dict[str, Any]) -> dict[str, Any]:
    return row["valid"] if isinstance(row.get("valid"), dict) else {}


def _curve(rows: list[dict], quantity: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The (epoch, value) points of ``quantity`` that are finite numbers (``read_run`` warned about the others)."""
    if quantity.startswith("valid "):
        pts = [(r["epoch"], _valid(r)[metric]) for r in rows if finite(_valid(r).get(metric))]
    else:
        pts = [(r["epoch"], r[quantity]) for r in rows if finite(r.get(quantity))]
    return np.array([p[0] for p in pts], dtype=int), np.array([p[1] for p in pts], dtype=float)


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over the epochs every run reached (early stopping ends seeds at different epochs)."""
    common = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
    return np.array(common), np.array([np.mean([y[list(x).index(e)] for x, y in curves]) for e in common])


# ---------------------------------------------------------------- a sweep's grid


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def grid_axis(values: list[str]) -> tuple[list[str], list[float], str]:
    """One grid key's values in plotting order, their x positions and the x scale (see the module doc):
    numbers sorted, at their values, on "linear", "log" or "symlog"; anything else "categorical", in grid order."""
    numbers = [_number(v) for v in values]
    if any(x is None for x in numbers):
        return values, [float(i) for i in range(len(values))], "categorical"
    order = sorted(range(len(values)), key=lambda i: numbers[i])
    values, numbers = [values[i] for i in order], [numbers[i] for i in order]
    positive = [x for x in numbers if x > 0]
    if min(numbers) < 0 or len(positive) < 2 or max(positive) / min(positive) < 10:
        return values, numbers, "linear"
    return values, numbers, "symlog" if 0 in numbers else "log"


def sweep_figure(sweep_dir: Path) -> Any:
    """Valid metric per grid point, mean ± std over seeds, one panel per config (see the module doc); the Figure."""
    record, trials, cfgs = load_sweep(sweep_dir)
    require_matplotlib()
    from matplotlib.lines import Line2D

    configs = summarize(trials, {name: cfg.train.metric for name, cfg in cfgs.items()})
    keys = [(item.partition("=")[0].strip(), split_values(item.partition("=")[2])) for item in record["grid"]]
    n = len(record["seeds"])
    heat = len(keys) == 2
    rest = [" ".join(p) for p in grid_points([f"{k}={','.join(v)}" for k, v in keys[1:]])] if not heat else []
    names = [f"{r} (mean ± std, n={n})" if r else f"mean ± std (n={n})" for r in rest]
    names += [] if heat else ["one seed"]
    names.append("selected (best mean valid)")
    floors = (read_summary(sweep_dir) or {}).get("popularity", {})  # data set -> valid and test metrics
    floor_of = {name: floors.get(cfgs[name].data.name, {}).get("valid", {}).get(c["metric"])
                for name, c in configs.items()}
    drawn = not heat and any(f is not None for f in floor_of.values())
    names += ["popularity (valid)"] if drawn else []
    panel = heat_panel(*(len(v) for _, v in keys)) if heat else PANEL
    ncol = _legend_columns(names, panel[0] * min(3, len(configs)))
    fig, axes = new_figure(len(configs), math.ceil(len(names) / ncol), panel)
    handles: list[Any] = []
    for ax, (name, c) in zip(axes, configs.items()):
        stats = {tuple(g["point"]): g["valid"] for g in c["grid"] if g["eligible"]}
        chosen = tuple(c["selected"]["point"]) if c["selected"] else None
        floor = floor_of[name]
        if heat:
            _heat_map(ax, fig, keys, stats, chosen, c["metric"])
        else:
            handles = _error_lines(ax, fig, keys, stats, chosen, names[:-3 if drawn else -2], c["metric"])
            if floor is not None:
                ax.axhline(floor, color="0.4", linestyle="--", linewidth=1, gid="popularity")
        missing = len(c["grid"]) - len(stats)
        ax.set_title(f"{name}: valid {c['metric']}\nmean ± std over n={n} seeds"
                     + (f", popularity {floor:.4f}" if heat and floor is not None else "")
                     + (f"\n{missing} point(s) left out: seeds not all finished" if missing else ""), fontsize=9)
    if not heat:  # one y-range for every panel, so that configs compare by eye
        low, high = min(ax.get_ylim()[0] for ax in axes), max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(low, high)
    star = Line2D([], [], marker="*", color="red", markeredgecolor="black", markersize=12, linestyle="none")
    floor_line = [Line2D([], [], color="0.4", linestyle="--", linewidth=1)] if drawn else []
    return _finish(fig, [*handles, star, *floor_line], names, ncol)


def heat_panel(rows: int, columns: int) -> tuple[float, float]:
    """Inches for a heat map of rows x columns cells: about 0.8 in a cell across and 0.55 down, so that a cell's
    three short lines (mean, ± std, n) fit inside it, plus room for the title, the labels and the colour bar."""
    return max(PANEL[0], 1.9 + 0.8 * columns), max(PANEL[1], 1.4 + 0.55 * rows)


def _heat_map(ax: Any, fig: Any, keys: list, stats: dict, chosen: tuple | None, metric: str) -> None:
    """Rows: the first key, columns: the second, each in ``grid_axis`` order; a cell says mean, ± std and n on three
    lines."""
    (k0, v0), (k1, v1) = ((k, grid_axis(v)[0]) for k, v in keys)
    cells = [[stats.get((f"{k0}={a}", f"{k1}={b}")) for b in v1] for a in v0]
    grid = np.array([[s["mean"] if s else np.nan for s in row] for row in cells], dtype=float)
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_facecolor("0.9")  # behind the cells left out (NaN)
    fig.colorbar(im, ax=ax, label=f"mean valid {metric}")
    low, high = np.nanmin(grid, initial=np.inf), np.nanmax(grid, initial=-np.inf)
    for i, j in np.ndindex(grid.shape):
        s = cells[i][j]
        std = "" if s is None or s["std"] is None else f"\n± {s['std']:.4f}"
        text = "n/a" if s is None else f"{s['mean']:.4f}{std}\nn={s['n']}"
        dark = s is not None and (high == low or (s["mean"] - low) / (high - low) < 0.6)  # viridis: dark below
        ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=7)
        if chosen == (f"{k0}={v0[i]}", f"{k1}={v1[j]}"):
            ax.plot(j + 0.36, i + 0.32, marker="*", color="red", markeredgecolor="black", markersize=10)
    ax.set(xticks=range(len(v1)), xticklabels=v1, xlabel=k1, yticks=range(len(v0)), yticklabels=v0, ylabel=k0)


def _error_lines(ax: Any, fig: Any, keys: list, stats: dict, chosen: tuple | None, labels: list[str],
                 metric: str) -> list[Any]:
    """x: the first key (``grid_axis``); one line with error bars per combination of the other keys, each shifted a
    few points sideways so that bars at one x do not hide each other, each seed's value a faint dot. Returns the
    legend handles: the lines, then a seed's dot."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import ScaledTranslation

    k0, values = keys[0] if keys else ("grid point", [""])
    values, xs, scale = grid_axis(values)
    combos = grid_points([f"{k}={','.join(v)}" for k, v in keys[1:]])
    handles = []
    for i, (rest, label) in enumerate(zip(combos, labels)):
        shift = ax.transData + ScaledTranslation(0.06 * (i - (len(combos) - 1) / 2), 0, fig.dpi_scale_trans)
        points = [tuple(p for p in (f"{k0}={v}" if keys else None, *rest) if p) for v in values]
        mean = np.array([stats[p]["mean"] if p in stats else np.nan for p in points], dtype=float)
        std = np.array([stats[p]["std"] if p in stats and stats[p]["std"] is not None else np.nan for p in points],
                       dtype=float)
        bars = ax.errorbar(xs, mean, yerr=std, marker="o", capsize=4, color=f"C{i}", transform=shift, label=label)
        handles.append(bars)
        for x, p, m, sd in zip(xs, points, mean, np.nan_to_num(std)):
            if p not in stats:
                continue
            seeds = stats[p]["values"]
            ax.plot([x] * len(seeds), seeds, marker="o", markersize=3.5, linestyle="none", color=f"C{i}", alpha=0.5,
                    transform=shift, gid="seed")
            ax.update_datalim([(x, y) for y in (*seeds, m - sd, m + sd)])  # shifted lines do not enter the limits
            if p == chosen:
                ax.plot(x, m, marker="*", color="red", markeredgecolor="black", markersize=14, transform=shift,
                        zorder=5)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
    elif scale == "log":
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.autoscale_view()
    ax.set_xticks(xs, labels=values)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=k0, ylabel=f"valid {metric}")
    return [*handles, Line2D([], [], marker="o", markersize=3.5, linestyle="none", color="gray", alpha=0.5)]

"""msi/plot.py: pictures of the expected size that are not blank, and figures that do not mislead: mean ± std with n
in a sweep, short labels in a legend off the panels, best epochs marked, whole-number epochs; damaged input and a
bad --out as one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from msi.cli import plot_main
from msi.errors import MSIError
from msi.rundir import append_metrics

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs .[plot]")
P = ("loss.alpha=0.1", "eval.ks=[10,20]"), ("loss.alpha=0.1", "eval.ks=[10,20,50]"), \
    ("loss.alpha=0.01", "eval.ks=[10,20]"), ("loss.alpha=0.01", "eval.ks=[10,20,50]")
VALID = {"recall": {P[0]: [(0.3, 0.1, False)] * 2, P[1]: [(0.5, 0.1, True)] * 2, P[2]: ["partial"] * 2,
                    P[3]: [(0.4, 0.1, False)] * 2},
         "ndcg": {p: [(0.3, 0.1 * i, True)] * 2 for i, p in enumerate(P)}}
TERMS = ("rec", "nce", "loss")


def png(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)  # (height, width, 4)


def assert_drawn(image: np.ndarray) -> None:
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 50  # lines, text and a colour map, not a blank canvas


def write_run(run_dir: Path, seed: int, valid: list[float], dropout: float = 0.3) -> Path:
    """A run directory as the trainer leaves it: config.yaml and one metrics row per epoch naming its terms."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model: {{dropout: {dropout}}}\ntrain: {{seed: {seed}}}\n")
    for epoch, v in enumerate(valid, 1):
        row = {"rec": 1 / epoch, "nce": 2 + epoch, "loss": 3 / epoch, "epoch": epoch, "epoch_seconds": 0.1,
               "grad_id": 0.5, "valid": {"recall@20": v}}
        append_metrics(run_dir, row, list(TERMS))
    return run_dir


def one_key_sweep(out: Path, key: str, values: dict[str, list[float]]) -> Path:
    """A sweep folder over one grid key, no training: ``values[v]`` is the valid recall@20 of each seed at ``v``."""
    seeds = len(next(iter(values.values())))
    return grid_sweep(out, [f"{key}={','.join(values)}"], seeds,
                      lambda point, seed: values[point[0].partition("=")[2]][seed])


def grid_sweep(out: Path, grid: list[str], seeds: int, recall) -> Path:
    """A sweep folder over ``grid``, no training: ``recall(point, seed)`` is a finished run's valid recall@20."""
    from msi.sweepdir import plan_trials, record_sweep

    config = out.parent / "cfg.yaml"
    config.write_text("data: {root: data, name: tiny}\ntrain: {metric: recall@20}\n")
    record_sweep(out, [config], grid, list(range(seeds)), [])
    for t in plan_trials([config], grid, list(range(seeds)), out):
        value = recall(t.point, t.seed)
        write_run(t.run_dir, t.seed, [value / 2, value])
        metrics = {"recall@20": value}
        (t.run_dir / "results.json").write_text(json.dumps({
            "best_epoch": 2, "epochs_run": 2, "valid": metrics, "test": metrics, "train_seconds": 1.0,
            "selected_by": "valid recall@20", "run_dir": str(t.run_dir)}))
    return out


def texts(fig) -> list[str]:
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    return legend + [t.get_text() for ax in fig.axes for t in (ax.title, *ax.texts)]


def assert_legend_off_the_panels(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_tightbbox(renderer))  # tick labels and titles included
    assert box.y1 <= min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.get_visible())  # below them


@needs_matplotlib
def test_run_curves_one_panel_per_quantity_and_a_legend_row_below(fabricate_sweep, tmp_path, capsys):
    out = fabricate_sweep(tmp_path / "s", VALID)
    runs = sorted(out.glob("recall_*_s*"))[:2]  # two seeds of one point, rows without named terms: valid, loss, rec
    assert plot_main([*map(str, runs), "--out", str(tmp_path / "runs.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'runs.png'} (1200x335)"
    image = png(tmp_path / "runs.png")
    assert image.shape[:2] == (335, 1200)  # 3 panels of 400x300, one legend row: 35
    assert_drawn(image)


@needs_matplotlib
def test_run_curves_short_labels_best_epochs_whole_epochs(tmp_path):
    from msi.plot import runs_figure

    runs = [write_run(tmp_path / "tiktok_bm3_model.dropout-0.5_s42", 42, [0.1, 0.3, 0.2]),
            write_run(tmp_path / "tiktok_bm3_model.dropout-0.5_s999", 999, [0.1, 0.2, 0.25, 0.22])]
    fig = runs_figure(runs)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == "valid recall@20 (higher is better)" and titles[1] == "rec"
    assert titles[2] == "nce: InfoNCE estimate of I(z^a; z^b)\n(higher = more shared)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["seed 42", "seed 999", "mean of 2",
                                                                  "best epoch (valid)"]
    for ax in panels:
        best = [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "best-epoch"]
        assert sorted(best) == [2, 3]  # each run's first epoch with its best valid recall
        assert all(float(t).is_integer() for t in ax.get_xticks())
    mean = [line for line in panels[0].lines if line.get_color() == "black"][0]
    assert list(mean.get_xdata()) == [1, 2, 3]  # the epochs both runs reached
    np.testing.assert_allclose(mean.get_ydata(), [0.1, 0.25, 0.225])
    assert_legend_off_the_panels(fig)


@needs_matplotlib
def test_run_curves_of_two_configs_are_labelled_by_what_differs(tmp_path):
    from msi.plot import runs_figure

    runs = [write_run(tmp_path / f"long_config_name_model.dropout-{p}_s{s}", s, [0.1, 0.2], dropout=p)
            for p in (0.3, 0.5) for s in (1, 2)]
    fig = runs_figure([*runs, write_run(tmp_path / "one", 7, [0.3, 0.1], dropout=0.7)])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "model.dropout=0.3 (mean of 2)", "model.dropout=0.5 (mean of 2)", "model.dropout=0.7 (seed 7)",
        "best epoch (valid)"]  # "mean of" only when n > 1
    assert sum(line.get_gid() == "best-epoch" for line in fig.axes[0].lines) == 5
    assert_legend_off_the_panels(fig)


@needs_matplotlib
def test_labels_spell_values_as_yaml_does(tmp_path):
    from msi.plot import runs_figure

    for name, ssd in (("a", "true"), ("b", "false")):
        write_run(tmp_path / name, 1, [0.1, 0.2])
        (tmp_path / name / "config.yaml").write_text(
            f"model: {{use_ssd: {ssd}}}\ndata: {{modalities: {{image: {name}.npy, text: t.npy}}}}\n"
            "train: {seed: 1}\n")
    assert [t.get_text() for t in runs_figure([tmp_path / "a", tmp_path / "b"]).legends[0].get_texts()][:2] == [
        "data.modalities={image: a.npy, text: t.npy}, model.use_ssd=true (seed 1)",
        "data.modalities={image: b.npy, text: t.npy}, model.use_ssd=false (seed 1)"]  # not {'image': ...}, True


@needs_matplotlib
def test_jsd_panel_is_titled_as_an_estimate(tmp_path):
    from msi.plot import runs_figure

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model: {mi_estimator: jsd}\n")
    append_metrics(run, {"jsd": -1.2, "loss": 1.0, "epoch": 1, "valid": {"recall@20": 0.1}}, ["jsd", "loss"])
    titles = [ax.get_title() for ax in runs_figure([run]).axes if ax.get_visible()]
    assert titles[1] == "jsd: JSD estimate of I(z^a; z^b)\n(higher = more shared)"


@needs_matplotlib
def test_sweep_heat_map_cells_say_mean_std_and_n(fabricate_sweep, tmp_path):
    from msi.plot import plot, sweep_figure

    out = fabricate_sweep(tmp_path / "s", VALID)
    assert plot([out], tmp_path / "grid.png") == (800, 335)
    image = png(tmp_path / "grid.png")
    assert image.shape[:2] == (335, 800)
    assert_drawn(image)
    fig = sweep_figure(out)
    shown = texts(fig)
    assert "recall: valid recall@20\nmean ± std over n=2 seeds\n1 point(s) left out: seeds not all finished" in shown
    assert "0.5000\n± 0.0000\nn=2" in shown and "n/a" in shown
    heat = fig.axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["0.01", "0.1"]  # numeric order, not grid order
    star = [line for line in heat.lines if line.get_marker() == "*"]
    assert len(star) == 1 and np.round(star[0].get_xydata()[0]).tolist() == [1, 1]  # alpha=0.1 (row 1), ks=[10,20,50]
    # (column 1); in the cell's upper right corner, off its text
    assert_legend_off_the_panels(fig)


@needs_matplotlib
def test_a_four_by_four_heat_map_grows_so_that_no_cell_text_overlaps_another(tmp_path):
    """The paper's alpha x beta grid: at the fixed panel size the cells' texts ran into each other."""
    from msi.plot import PANEL, sweep_figure

    values = ["1e-1", "1e-2", "1e-3", "1e-4"]
    out = grid_sweep(tmp_path / "s", [f"loss.beta={','.join(values)}", f"loss.alpha={','.join(values)}"], 3,
                     lambda point, seed: 0.08 + 0.001 * len(point[0] + point[1]) + 0.0123 * seed)
    fig = sweep_figure(out)
    width, height = fig.get_size_inches()
    assert width > PANEL[0] and height > PANEL[1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    heat = fig.axes[0]
    cells = [t for t in heat.texts if t.get_text() != "n/a"]
    assert len(cells) == 16 and cells[0].get_text().count("\n") == 2  # mean, ± std, n
    boxes = [t.get_window_extent(renderer) for t in cells]
    panel = heat.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1:])
        assert panel.contains(a.x0, a.y0) and panel.contains(a.x1, a.y1)
    assert_legend_off_the_panels(fig)


@needs_matplotlib
def test_sweep_lines_have_error_bars_numeric_order_and_a_symlog_axis_through_0(tmp_path):
    from matplotlib.container import ErrorbarContainer

    from msi.plot import sweep_figure

    out = one_key_sweep(tmp_path / "s", "loss.alpha", {"0.1": [0.30, 0.34], "0": [0.20, 0.20],
                                                       "0.001": [0.25, 0.27], "0.01": [0.40, 0.44]})
    fig = sweep_figure(out)
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    line, _, (segments,) = bars
    np.testing.assert_allclose(line.get_ydata(), [0.20, 0.26, 0.42, 0.32])  # means at 0, 0.001, 0.01, 0.1
    lengths = [seg[1, 1] - seg[0, 1] for seg in segments.get_segments()]
    np.testing.assert_allclose(lengths, 2 * np.std([[0.20, 0.20], [0.25, 0.27], [0.40, 0.44], [0.30, 0.34]],
                                                   axis=1, ddof=1), atol=1e-12)  # ± sample std
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.001", "0.01", "0.1"]
    assert ax.get_xscale() == "symlog"
    star = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert len(star) == 1 and star[0].get_xydata()[0].tolist() == [0.01, pytest.approx(0.42)]
    assert ["mean ± std (n=2)", "one seed", "selected (best mean valid)"] == [
        t.get_text() for t in fig.legends[0].get_texts()]
    seeds = sorted(y for ln in ax.lines if ln.get_gid() == "seed" for y in ln.get_ydata())
    assert seeds == [0.20, 0.20, 0.25, 0.27, 0.30, 0.34, 0.40, 0.44]  # each seed's value drawn too
    assert_legend_off_the_panels(fig)


@needs_matplotlib
def test_sweep_panels_share_one_y_range_and_draw_the_popularity_floor(fabricate_sweep, tmp_path):
    from msi.plot import sweep_figure
    from msi.select import report

    low, high = ("loss.alpha=0.1",), ("loss.alpha=0.01",)
    out = fabricate_sweep(tmp_path / "s", {"a": {low: [(0.10, 0.1, True)] * 2, high: [(0.12, 0.1, True)] * 2},
                                           "b": {low: [(0.50, 0.1, True)] * 2, high: [(0.55, 0.1, True)] * 2}},
                          grid=["loss.alpha=0.1,0.01"])
    floor = report(out)["popularity"]["tiny"]["valid"]["recall@20"]
    fig = sweep_figure(out)
    a, b = fig.axes[:2]
    assert a.get_ylim() == b.get_ylim() and a.get_ylim()[0] < 0.10 and a.get_ylim()[1] > max(0.55, floor)
    for ax in (a, b):
        (line,) = [ln for ln in ax.lines if ln.get_gid() == "popularity"]
        assert list(line.get_ydata()) == [floor, floor]
        assert ax.get_xlabel() == "loss.alpha"
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "popularity (valid)"
    assert_legend_off_the_panels(fig)


def test_grid_axis_orders_numbers_and_picks_the_scale():
    from msi.plot import grid_axis

    assert grid_axis(["0.5", "0.3"]) == (["0.3", "0.5"], [0.3, 0.5], "linear")
    assert grid_axis(["0.1", "0.001", "0.01"]) == (["0.001", "0.01", "0.1"], [0.001, 0.01, 0.1], "log")
    assert grid_axis(["1e-2", "0", "1e-4"]) == (["0", "1e-4", "1e-2"], [0.0, 1e-4, 1e-2], "symlog")
    assert grid_axis(["[10,20]", "[5]"]) == (["[10,20]", "[5]"], [0.0, 1.0], "categorical")


@needs_matplotlib
def test_a_partial_last_metrics_line_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "r_s1", 1, [0.1, 0.2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"rec": 0.3, "nce": 4, "lo')  # what a crash mid-write leaves
    assert plot_main([str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'r.png'} (")


@pytest.mark.parametrize("name", ["x.xyz", "noext"])
def test_an_unsupported_out_is_a_one_line_error(tmp_path, capsys, name):
    run = write_run(tmp_path / "r_s1", 1, [0.1])
    assert plot_main([str(run), "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name}: ") and len(err.splitlines()) == 1
    assert ".png, .pdf, .svg" in err
    assert list(tmp_path.iterdir()) == [run]  # nothing written, not even noext.png


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml: not found" in err and len(err.splitlines()) == 1


def test_a_damaged_metrics_row_is_a_one_line_error(tmp_path, capsys):
    run = write_run(tmp_path / "r_s1", 1, [0.1, 0.2])
    (run / "metrics.jsonl").write_text('{"loss": 1, "epoch": 1}\nnot json\n{"loss": 1, "epoch": 3}\n')
    assert plot_main([str(run), "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'metrics.jsonl'}:2: damaged") and len(err.splitlines()) == 1


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    from msi.plot import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MSIError, match=r"pip install -e '\.\[plot\]'"):
        new_figure(1, 0)


def test_msi_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "r_s1", 1, [0.1, 0.2])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_main([str(run), "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: msi-plot needs matplotlib") and len(err.splitlines()) == 1
    assert not (tmp_path / "r.png").exists()

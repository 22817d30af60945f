"""msi/plot.py: PNGs of the expected size that are not blank, for run directories and for a sweep."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from msi.cli import plot_main
from msi.errors import MSIError

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs .[plot]")
P = ("loss.alpha=0.1", "eval.ks=[10,20]"), ("loss.alpha=0.1", "eval.ks=[10,20,50]"), \
    ("loss.alpha=0.01", "eval.ks=[10,20]"), ("loss.alpha=0.01", "eval.ks=[10,20,50]")
VALID = {"recall": {P[0]: [(0.3, 0.1, False)] * 2, P[1]: [(0.5, 0.1, True)] * 2, P[2]: ["partial"] * 2,
                    P[3]: [(0.4, 0.1, False)] * 2},
         "ndcg": {p: [(0.3, 0.1 * i, True)] * 2 for i, p in enumerate(P)}}


def png(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)  # (height, width, 4)


def assert_drawn(image: np.ndarray) -> None:
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 50  # lines, text and a colour map, not a blank canvas


@needs_matplotlib
def test_run_curves_one_panel_per_quantity(fabricate_sweep, tmp_path, capsys):
    out = fabricate_sweep(tmp_path / "s", VALID)
    runs = sorted(out.glob("recall_*_s*"))[:2]  # two seeds of one point: valid recall@20, loss, rec
    assert plot_main([*map(str, runs), "--out", str(tmp_path / "runs.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'runs.png'} (1200x300)"
    image = png(tmp_path / "runs.png")
    assert image.shape[:2] == (300, 1200)
    assert_drawn(image)


@needs_matplotlib
def test_sweep_heat_map_one_panel_per_config(fabricate_sweep, tmp_path):
    from msi.plot import plot

    out = fabricate_sweep(tmp_path / "s", VALID)
    assert plot([out], tmp_path / "grid.png") == (800, 300)
    image = png(tmp_path / "grid.png")
    assert image.shape[:2] == (300, 800)
    assert_drawn(image)


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml: not found" in err and len(err.splitlines()) == 1


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    from msi.plot import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MSIError, match=r"pip install -e '\.\[plot\]'"):
        pyplot()

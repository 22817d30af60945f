"""scripts/cca.py: canonical correlations between two feature sets, in sample and on held-out items."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def cca():
    return load_script("cca")


def two_views(n: int, shared: np.ndarray, p: int = 12, q: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views a (n, p), b (n, q) sharing len(shared) latent directions with correlations ``shared``, mixed by
    random invertible maps (CCA is invariant to them)."""
    rng = np.random.default_rng(seed)
    k = len(shared)
    z = rng.standard_normal((n, k))
    a_lat = np.concatenate([z, rng.standard_normal((n, p - k))], axis=1)
    noise = rng.standard_normal((n, k))
    b_lat = np.concatenate([shared * z + np.sqrt(1 - shared**2) * noise, rng.standard_normal((n, q - k))], axis=1)
    return a_lat @ rng.standard_normal((p, p)) + 5.0, b_lat @ rng.standard_normal((q, q)) - 2.0


def test_planted_correlations_are_recovered(cca):
    a, b = two_views(20_000, np.array([0.9, 0.6, 0.3]))
    rho, da, db = cca.cca_directions(a, b, ridge=0.0)
    np.testing.assert_allclose(rho[:3], [0.9, 0.6, 0.3], atol=0.02)
    assert rho[3:].max() < 0.05 and da.shape == (12, 9) and db.shape == (9, 9)
    np.testing.assert_allclose(cca.held_out_correlations(a, b, ridge=0.0)[:3], [0.9, 0.6, 0.3], atol=0.03)


def test_held_out_removes_the_bias_of_few_items_and_many_columns(cca):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 60)), rng.standard_normal((300, 60))  # nothing shared
    assert cca.cca_directions(a, b)[0][0] > 0.5  # in sample, noise alone looks correlated
    assert abs(cca.held_out_correlations(a, b)[:5]).max() < 0.3


def test_cli_prints_json_and_names_a_bad_file(cca, tmp_path, capsys):
    a, b = two_views(500, np.array([0.8]))
    np.save(tmp_path / "a.npy", a.astype(np.float32))
    np.save(tmp_path / "b.npy", b[:400].astype(np.float32))
    assert cca.main([str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 500 and out["in_sample"][0] == pytest.approx(1.0, abs=1e-3)
    assert cca.main([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 2
    assert "500 and 400 rows" in capsys.readouterr().err
    assert cca.main([str(tmp_path / "a.npy"), str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err

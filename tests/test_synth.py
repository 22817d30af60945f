"""Tests for msi.data.synth: the layout of the written files, determinism, and the planted structure."""
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from msi.data import synth
from msi.errors import ConfigError, DataError

FILES = ("tiny.inter", "image_feat.npy", "text_feat.npy")
# Wider than tiny so pairwise statistics and least squares have enough items; still generates in milliseconds.
MID = dataclasses.replace(synth.PRESETS["tiny"], n_users=300, n_items=300, n_interactions=2400,
                          image_dim=64, text_dim=48)


def _read_inter(path: Path) -> np.ndarray:
    """The .inter rows as an (N, 4) int array: userID, itemID, timestamp, x_label."""
    return np.loadtxt(path, delimiter="\t", skiprows=1, usecols=(0, 1, 3, 4), dtype=np.int64, ndmin=2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pair_cosines(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every item pair (i < j) of the centred rows of x (I, F); shape (I*(I-1)/2,)."""
    x = x - x.mean(axis=0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (x @ x.T)[np.triu_indices(x.shape[0], 1)]


def _residual(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x (I, F) minus its least-squares fit from q (I, k): what the item factors do not explain."""
    coef, *_ = np.linalg.lstsq(q, x, rcond=None)
    return x - q @ coef


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    synth.generate("tiny", out, seed=0, progress=False)
    return out


def test_tiny_layout(tiny_dir: Path) -> None:
    preset = synth.PRESETS["tiny"]
    inter = tiny_dir / "tiny.inter"  # name defaults to the folder's basename
    assert sorted(f.name for f in tiny_dir.iterdir()) == sorted(FILES)  # no .part files left behind
    assert inter.read_text().splitlines()[0] == "userID\titemID\trating\ttimestamp\tx_label"
    ratings = np.loadtxt(inter, delimiter="\t", skiprows=1, usecols=2)
    assert np.all(ratings == 1.0)
    users, items, stamps, labels = _read_inter(inter).T
    assert abs(users.size - preset.n_interactions) <= 0.02 * preset.n_interactions
    assert np.array_equal(np.unique(users), np.arange(preset.n_users))
    assert np.array_equal(np.unique(items), np.arange(preset.n_items))
    assert np.unique(users * preset.n_items + items).size == users.size  # no duplicate pairs
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(np.unique(users[labels == 0]), np.arange(preset.n_users))
    for label in (1, 2):  # every user has >= 5 rows, so each has a valid and a test row
        assert np.array_equal(np.unique(users[labels == label]), np.arange(preset.n_users))
    assert np.bincount(users).min() >= preset.min_degree
    assert stamps.min() > 0
    for fname, dim in (("image_feat.npy", preset.image_dim), ("text_feat.npy", preset.text_dim)):
        feats = np.load(tiny_dir / fname)
        assert feats.shape == (preset.n_items, dim) and feats.dtype == np.float32
        assert np.isfinite(feats).all()


def test_same_seed_same_bytes_other_seed_differs(tiny_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "tiny"
    assert synth.generate("tiny", again, seed=0, progress=False) == again / "tiny.inter"
    other = tmp_path / "other"
    synth.generate("tiny", other, seed=1, name="tiny", progress=False)
    for fname in FILES:
        assert _sha256(tiny_dir / fname) == _sha256(again / fname)
        assert _sha256(tiny_dir / fname) != _sha256(other / fname)


def test_custom_name_and_nested_out_dir(tmp_path: Path) -> None:
    path = synth.generate("tiny", tmp_path / "a" / "b", name="toy", progress=False)
    assert path == tmp_path / "a" / "b" / "toy.inter" and path.exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_features_follow_item_factors(tmp_path: Path, seed: int) -> None:
    synth.generate(MID, tmp_path, seed=seed, progress=False)
    factor_cos = _pair_cosines(synth.item_factors(MID, seed))
    for fname in ("image_feat.npy", "text_feat.npy"):
        feat_cos = _pair_cosines(np.load(tmp_path / fname))
        assert np.corrcoef(feat_cos, factor_cos)[0, 1] > 0.3, fname


def test_item_factors_are_linearly_recoverable_on_held_out_items(tmp_path: Path) -> None:
    synth.generate(MID, tmp_path, seed=0, progress=False)
    q = synth.item_factors(MID, 0)
    fit, held = slice(0, 225), slice(225, None)
    for fname in ("image_feat.npy", "text_feat.npy"):
        x = np.load(tmp_path / fname).astype(np.float64)
        coef, *_ = np.linalg.lstsq(x[fit], q[fit], rcond=None)
        err = q[held] - x[held] @ coef
        assert 1.0 - (err**2).sum() / ((q[held] - q[held].mean(0)) ** 2).sum() > 0.5, fname


@pytest.mark.parametrize("nuisance_scale, shared", [(1.0, True), (0.0, False)])
def test_nuisance_is_shared_by_both_modalities(tmp_path: Path, nuisance_scale: float, shared: bool) -> None:
    preset = dataclasses.replace(MID, nuisance_scale=nuisance_scale)
    synth.generate(preset, tmp_path, seed=0, progress=False)
    q = synth.item_factors(preset, 0)
    image_rest = _residual(np.load(tmp_path / "image_feat.npy"), q)
    text_rest = _residual(np.load(tmp_path / "text_feat.npy"), q)
    r = np.corrcoef(_pair_cosines(image_rest), _pair_cosines(text_rest))[0, 1]
    assert (r > 0.3) if shared else (abs(r) < 0.1)


@pytest.mark.parametrize("signal, shared_rest", [("mixed", True), ("shared", False), ("specific", True)])
def test_signal_decides_whether_the_modalities_share_their_nuisance(tmp_path: Path, signal: str,
                                                                    shared_rest: bool) -> None:
    synth.generate(MID, tmp_path, seed=0, progress=False, signal=signal)
    q = synth.item_factors(MID, 0)
    image_rest = _residual(np.load(tmp_path / "image_feat.npy"), q)
    text_rest = _residual(np.load(tmp_path / "text_feat.npy"), q)
    r = np.corrcoef(_pair_cosines(image_rest), _pair_cosines(text_rest))[0, 1]
    assert (r > 0.3) if shared_rest else (abs(r) < 0.1)


@pytest.mark.parametrize("signal", ["mixed", "shared", "specific"])
def test_specific_signal_splits_the_factors_between_the_modalities(tmp_path: Path, signal: str) -> None:
    """Least squares of each modality on Q: under ``specific`` image uses only the first half of the factors and
    text only the second; otherwise both use all of them (no noise and no nuisance, so the fit is exact)."""
    clean = dataclasses.replace(MID, image_noise=0.0, text_noise=0.0, nuisance_scale=0.0)
    synth.generate(clean, tmp_path, seed=0, progress=False, signal=signal)
    q, half = synth.item_factors(clean, 0), MID.n_factors // 2
    for fname, own in (("image_feat.npy", slice(0, half)), ("text_feat.npy", slice(half, None))):
        coef, *_ = np.linalg.lstsq(q, np.load(tmp_path / fname).astype(np.float64), rcond=None)  # (k, F)
        weight = np.abs(coef).mean(axis=1)
        other = np.ones(MID.n_factors, bool)
        other[own] = False
        ratio = weight[other].mean() / weight[own].mean()
        assert (ratio < 1e-3) if signal == "specific" else (ratio > 0.5), (fname, ratio)


def test_mixed_signal_is_the_default_and_keeps_its_bytes(tmp_path: Path) -> None:
    synth.generate("tiny", tmp_path / "a", seed=0, progress=False)
    synth.generate("tiny", tmp_path / "b", seed=0, progress=False, name="a", signal="mixed")
    for fname in ("a.inter", "image_feat.npy", "text_feat.npy"):
        assert _sha256(tmp_path / "a" / fname) == _sha256(tmp_path / "b" / fname)
    with pytest.raises(ConfigError, match="signal"):
        synth.generate("tiny", tmp_path / "c", signal="both", progress=False)


def test_popularity_is_long_tailed(tmp_path: Path) -> None:
    synth.generate(MID, tmp_path, name="mid", progress=False)
    counts = np.sort(np.bincount(_read_inter(tmp_path / "mid.inter")[:, 1]))[::-1]
    assert counts[: MID.n_items // 10].sum() > 0.25 * counts.sum()


def test_alias_table_gives_exact_probabilities() -> None:
    weights = np.array([1.0, 2.0, 3.0, 0.5, 10.0, 0.25])
    prob, alias = synth._alias_table(weights)
    implied = prob.copy()  # mass of j: kept when drawn, plus every slot that falls through to j
    np.add.at(implied, alias, 1.0 - prob)
    np.testing.assert_allclose(implied / weights.size, weights / weights.sum(), rtol=1e-12)


def test_unknown_preset_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'huge'.*tiny, quickstart, baby, sports, elec"):
        synth.generate("huge", tmp_path, progress=False)


@pytest.mark.parametrize("change", [{"n_items": 6}, {"n_interactions": 10}, {"image_dim": 0},
                                    {"affinity_scale": 30.0}, {"text_noise": -1.0}])
def test_bad_preset_values_are_rejected(change: dict) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(synth.PRESETS["tiny"], **change)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_rejected(tmp_path: Path, seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        synth.generate("tiny", tmp_path, seed=seed, progress=False)
    assert not any(tmp_path.iterdir())


def test_paper_sized_presets() -> None:
    sizes = {name: (p.n_users, p.n_items, p.n_interactions, p.image_dim, p.text_dim)
             for name, p in synth.PRESETS.items() if name in ("baby", "sports", "elec")}
    assert sizes == {"baby": (19_445, 7_050, 160_792, 4096, 384), "sports": (35_598, 18_357, 296_337, 4096, 384),
                     "elec": (192_403, 63_001, 1_689_188, 4096, 384)}


def test_a_folder_holding_files_is_refused_unless_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    synth.generate("tiny", out, seed=0, progress=False)
    (out / "u_id_mapping.csv").write_text("user_id\tuserID\nA\t0\n")  # an earlier data set's files
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=f"^{out}: already holds image_feat.npy, text_feat.npy, tiny.inter, "
                                        "u_id_mapping.csv; msi-data synth --overwrite replaces"):
        synth.generate("tiny", out, seed=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    synth.generate("tiny", out, seed=1, progress=False, overwrite=True)  # the stale mapping goes with the rest
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert _sha256(out / "tiny.inter") != _sha256(tiny_dir / "tiny.inter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # the staging folder is gone
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds notes.txt, not part of a data set; --overwrite replaces only"):
        synth.generate("tiny", out, seed=0, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "tiny.inter").is_file()


def test_an_empty_folder_is_written_into(tiny_dir: Path, tmp_path: Path) -> None:
    synth.generate("tiny", tmp_path, seed=0, name="tiny", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert _sha256(tmp_path / "tiny.inter") == _sha256(tiny_dir / "tiny.inter")


@pytest.mark.parametrize("name", ["../evil", "a/b", ".."])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        synth.generate("tiny", tmp_path / "x", name=name, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_full_disk_names_the_file_and_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "tiny"
    synth.generate("tiny", out, seed=0, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = synth._write_features

    def disk_full_at_the_text_features(path, *args):
        real(path, *args)
        if path.name == "text_feat.npy":
            path.write_bytes(b"")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "_write_features", disk_full_at_the_text_features)
    with pytest.raises(DataError, match=f"^{out / 'text_feat.npy'}: could not write \\(No space left on device\\); "
                                        f"{out} is left as it was$"):
        synth.generate("tiny", out, seed=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder, no 0-byte file
    with pytest.raises(DataError, match="text_feat.npy: could not write"):
        synth.generate("tiny", tmp_path / "new", seed=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]

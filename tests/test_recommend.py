"""msi/recommend.py: id mappings, user selection, and the TSV of top-k lists (train items excluded, raw ids)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from msi.config import Config
from msi.data.dataset import Dataset
from msi.errors import DataError, MSIError
from msi.models import build_model
import msi.recommend
from msi.recommend import check_output, read_id_mapping, select_users, write_recommendations


# ---------------------------------------------------------------- read_id_mapping


def test_read_id_mapping_maps_indices_to_raw_ids_in_either_column_order(tmp_path):
    path = tmp_path / "i_id_mapping.csv"
    path.write_text("asin\titemID\nB00X\t1\nB00A\t0\n\nB00Z\t2\n")  # MMRec: raw id, then index
    assert read_id_mapping(path, "itemID", 3).tolist() == ["B00A", "B00X", "B00Z"]
    path.write_text("userID\tuser_id\n0\tA2X\n1\tA1Y\n")
    assert read_id_mapping(path, "userID", 2).tolist() == ["A2X", "A1Y"]


def test_read_id_mapping_without_a_file_is_none(tmp_path):
    assert read_id_mapping(tmp_path / "u_id_mapping.csv", "userID", 3) is None


def test_read_id_mapping_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "i_id_mapping.csv"
    path.write_text("asin,itemID\nB00A,0\n")  # commas, not tabs
    with pytest.raises(DataError, match=r"i_id_mapping.csv:1: expected two tab-separated columns"):
        read_id_mapping(path, "itemID", 1)
    path.write_text("asin\titemID\nB00A\t0\nB00B\tone\n")
    with pytest.raises(DataError, match=r"i_id_mapping.csv:3: itemID 'one' is not an integer"):
        read_id_mapping(path, "itemID", 2)
    path.write_text("asin\titemID\nB00A\t0\nB00B\t7\n")  # index beyond the data set
    with pytest.raises(DataError, match=r"i_id_mapping.csv:3:"):
        read_id_mapping(path, "itemID", 2)
    path.write_text("asin\titemID\nB00A\t0\nB00B\t-1\n")  # numpy would put it at the last index
    with pytest.raises(DataError, match=r"i_id_mapping.csv:3: itemID '-1' is negative"):
        read_id_mapping(path, "itemID", 2)
    path.write_text("asin\titemID\nB00A\t0\nB00B\t1\nB00C\t0\n")
    with pytest.raises(DataError, match=r"i_id_mapping.csv:4: itemID 0 is given a second raw id \('B00C' after "):
        read_id_mapping(path, "itemID", 2)


# ---------------------------------------------------------------- select_users


def test_select_users_all_split_and_file(tiny, tmp_path):
    assert select_users("all", tiny, "test").tolist() == list(range(tiny.n_users))
    assert select_users("split", tiny, "valid").tolist() == sorted(set(tiny.valid[:, 0].tolist()))
    path = tmp_path / "users.txt"
    path.write_text("3\n\n 0 \n59\n")
    assert select_users(str(path), tiny, "test").tolist() == [3, 0, 59]


def test_select_users_bad_lines_name_the_file_and_line(tiny, tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("3\nalice\n")
    with pytest.raises(DataError, match=r"users.txt:2: userID 'alice' is not an integer"):
        select_users(str(path), tiny, "test")
    path.write_text("3\n60\n")
    with pytest.raises(DataError, match=r"users.txt:2: userID 60 is outside 0..59"):
        select_users(str(path), tiny, "test")
    path.write_text("3\n\n4\n03\n")
    with pytest.raises(DataError, match=r"users.txt:4: userID 3 is listed again \(first on line 1\)"):
        select_users(str(path), tiny, "test")
    path.write_text("\n \n")
    with pytest.raises(DataError, match=r"users.txt: holds no userIDs"):
        select_users(str(path), tiny, "test")
    with pytest.raises(MSIError, match="not 'all', 'split' or an existing file"):
        select_users(str(tmp_path / "missing.txt"), tiny, "test")


# ---------------------------------------------------------------- write_recommendations


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def train_sets(dataset: Dataset, *splits: str) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    for split in splits:
        for u, i in dataset.split(split):
            seen.setdefault(int(u), set()).add(int(i))
    return seen


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    return build_model(Config(), tiny).eval()


def test_recommendations_exclude_train_items(tiny, model, tmp_path):
    out = tmp_path / "recs" / "recs.tsv"
    assert write_recommendations(model, tiny, out, users="all", k=10) == (tiny.n_users, 10 * tiny.n_users)
    assert out.read_text().splitlines()[0] == "userID\trank\titemID\tscore"
    rows = read_tsv(out)
    assert len(rows) == 10 * tiny.n_users
    seen = train_sets(tiny, "train")
    by_user: dict[int, list[tuple[int, int, float]]] = {}
    for r in rows:
        by_user.setdefault(int(r["userID"]), []).append((int(r["rank"]), int(r["itemID"]), float(r["score"])))
    assert sorted(by_user) == list(range(tiny.n_users))
    for u, recs in by_user.items():
        assert [r for r, _, _ in recs] == list(range(1, 11))
        items = [i for _, i, _ in recs]
        assert len(set(items)) == 10 and not set(items) & seen[u]
        scores = [s for _, _, s in recs]
        assert scores == sorted(scores, reverse=True)
    assert [p.name for p in (tmp_path / "recs").iterdir()] == ["recs.tsv"]  # no temporary file left


def test_mask_valid_also_excludes_valid_items_at_test(tiny, model, tmp_path):
    out = tmp_path / "recs.tsv"
    write_recommendations(model, tiny, out, users="split", k=30, split="test", mask_valid=True)
    seen = train_sets(tiny, "train", "valid")
    for r in read_tsv(out):
        assert int(r["itemID"]) not in seen[int(r["userID"])]
    # by default valid items stay candidates: with k = 30 of 40 items some of them are listed
    write_recommendations(model, tiny, out, users="split", k=30, split="test")
    valid = train_sets(tiny, "valid")
    assert any(int(r["itemID"]) in valid.get(int(r["userID"]), set()) for r in read_tsv(out))


def test_raw_ids_are_written_when_the_data_folder_has_mappings(tiny, model, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "u_id_mapping.csv").write_text(
        "user_id\tuserID\n" + "".join(f"U{u:03d}\t{u}\n" for u in range(tiny.n_users)))
    (folder / "i_id_mapping.csv").write_text(
        "asin\titemID\n" + "".join(f"B{i:04d}\t{i}\n" for i in range(tiny.n_items)))
    mapped = Dataset(tiny.name, folder, tiny.n_users, tiny.n_items, tiny.train, tiny.valid, tiny.test,
                     tiny.features)
    users = tmp_path / "users.txt"
    users.write_text("5\n2\n")
    write_recommendations(model, tiny, tmp_path / "plain.tsv", users=str(users), k=4)
    write_recommendations(model, mapped, tmp_path / "raw.tsv", users=str(users), k=4)
    plain, raw = read_tsv(tmp_path / "plain.tsv"), read_tsv(tmp_path / "raw.tsv")
    assert [r["userID"] for r in raw] == ["U005"] * 4 + ["U002"] * 4
    assert [r["itemID"] for r in raw] == [f"B{int(r['itemID']):04d}" for r in plain]
    assert [r["score"] for r in raw] == [r["score"] for r in plain]


def test_k_above_the_candidate_count_writes_only_real_items(tmp_path):
    """3 items, user 0 has 2 in train: one candidate left, so one row, not three with -inf scores."""
    train = np.array([[0, 0], [0, 1], [1, 2]])
    empty = np.zeros((0, 2), dtype=np.int64)
    feats = {"image": np.eye(3, 4, dtype=np.float32), "text": np.eye(3, 2, dtype=np.float32)}
    ds = Dataset("small", tmp_path, 2, 3, train, empty, np.array([[0, 2]]), feats)
    torch.manual_seed(0)
    model = build_model(Config(), ds).eval()
    write_recommendations(model, ds, tmp_path / "r.tsv", users="all", k=3)
    rows = read_tsv(tmp_path / "r.tsv")
    assert [(r["userID"], r["rank"], r["itemID"]) for r in rows if r["userID"] == "0"] == [("0", "1", "2")]
    assert len([r for r in rows if r["userID"] == "1"]) == 2


def test_only_a_new_file_or_an_earlier_tsv_is_written(tiny, model, tmp_path):
    tsv = tmp_path / "recs.tsv"
    write_recommendations(model, tiny, tsv, k=2)
    check_output(tsv)  # an earlier output is replaced
    check_output(tmp_path / "new.tsv")
    for name, content in (("best.pt", b"PK\x03\x04zip"), ("results.json", b'{"test": 1}'), ("tiny.inter", b"userID\t"),
                          ("empty.tsv", b""), ("other.tsv", b"userID\trank\titemID\tscore_x\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MSIError, match=f"^{tmp_path / name}: exists and was not written by msi-recommend"):
            write_recommendations(model, tiny, tmp_path / name, k=2)
        assert (tmp_path / name).read_bytes() == content
    with pytest.raises(MSIError, match=f"^{tmp_path}: is a folder, not a file"):
        check_output(tmp_path)
    with pytest.raises(MSIError, match=f"^{tmp_path / 'best.pt' / 'x' / 'r.tsv'}: {tmp_path / 'best.pt'} is a file, "
                                      "not a folder"):
        write_recommendations(model, tiny, tmp_path / "best.pt" / "x" / "r.tsv", k=2)


def test_two_writers_of_one_file_leave_one_whole_output(tiny, model, tmp_path, monkeypatch):
    """A second writer starts and finishes while the first is half-way: each writes its own temporary file and
    renames it, so the file holds one complete output (the last renamed) and no temporary file is left."""
    out = tmp_path / "recs.tsv"
    real = msi.recommend._write_rows
    calls = []

    def second_writer_meanwhile(*args):
        calls.append(1)
        if len(calls) == 1:
            write_recommendations(model, tiny, out, k=7, batch_users=1000)
        return real(*args)

    monkeypatch.setattr(msi.recommend, "_write_rows", second_writer_meanwhile)
    assert write_recommendations(model, tiny, out, k=3, batch_users=20) == (tiny.n_users, 3 * tiny.n_users)
    rows = read_tsv(out)
    assert len(rows) == 3 * tiny.n_users and {r["rank"] for r in rows} == {"1", "2", "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["recs.tsv"]


def test_a_full_disk_keeps_the_earlier_output_and_leaves_no_temporary_file(tiny, model, tmp_path, monkeypatch):
    out = tmp_path / "recs.tsv"
    write_recommendations(model, tiny, out, k=2)
    before = out.read_bytes()
    real = msi.recommend._write_rows

    def disk_full(f, *args):
        real(f, *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(msi.recommend, "_write_rows", disk_full)
    with pytest.raises(MSIError, match=f"^{out}: could not write the recommendations \\(No space left on device\\)"):
        write_recommendations(model, tiny, out, k=5)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["recs.tsv"]

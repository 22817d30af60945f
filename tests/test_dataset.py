"""msi.data.dataset: the MMRec layout, read from tiny hand-written files; every error names the file (and line)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from msi.data.dataset import load_dataset, load_features, read_inter
from msi.errors import DataError

MODALITIES = {"image": "image_feat.npy", "text": "text_feat.npy"}
HEADER = "userID\titemID\trating\ttimestamp\tx_label\n"
# user 0: items 0, 1 train, 2 valid; user 1: item 1 train, item 0 test; user 2: item 2 train
GOOD = HEADER + "0\t0\t5\t100\t0\n0\t1\t4\t101\t0\n1\t1\t3\t102\t0\n2\t2\t5\t103\t0\n0\t2\t1\t104\t1\n1\t0\t2\t105\t2\n"


def _features(n_items: int = 3) -> dict[str, np.ndarray]:
    return {"image_feat.npy": np.arange(n_items * 4, dtype=np.float32).reshape(n_items, 4),
            "text_feat.npy": np.ones((n_items, 2), dtype=np.float32)}


def test_reads_a_good_file(tmp_path, write_dataset):
    write_dataset(tmp_path, "ds", GOOD, _features())
    ds = load_dataset(tmp_path, "ds", MODALITIES)
    assert (ds.name, ds.n_users, ds.n_items) == ("ds", 3, 3)
    np.testing.assert_array_equal(ds.train, [[0, 0], [0, 1], [1, 1], [2, 2]])
    np.testing.assert_array_equal(ds.valid, [[0, 2]])
    np.testing.assert_array_equal(ds.test, [[1, 0]])
    assert ds.train.dtype == np.int64 and ds.train.shape == (4, 2)
    assert ds.dropped == {"train": 0, "valid": 0, "test": 0}
    assert list(ds.features) == ["image", "text"]
    np.testing.assert_array_equal(ds.features["image"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(ds.split("valid"), ds.valid)
    with pytest.raises(ValueError, match="unknown split"):
        ds.split("dev")
    assert "3 users, 3 items" in ds.summary()


def test_read_inter_returns_int64_columns(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "ds", GOOD)
    users, items, labels = read_inter(path)
    np.testing.assert_array_equal(users, [0, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(items, [0, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 2])
    assert users.dtype == items.dtype == labels.dtype == np.int64


def test_any_column_order_and_no_rating_or_timestamp(tmp_path, write_dataset):
    text = "x_label\titemID\tuserID\n0\t0\t0\n0\t1\t0\n0\t1\t1\n0\t2\t2\n1\t2\t0\n2\t0\t1\n"
    write_dataset(tmp_path, "ds", text)
    ds = load_dataset(tmp_path, "ds")
    np.testing.assert_array_equal(ds.train, [[0, 0], [0, 1], [1, 1], [2, 2]])
    np.testing.assert_array_equal(ds.valid, [[0, 2]])
    np.testing.assert_array_equal(ds.test, [[1, 0]])
    assert ds.features == {}


def test_crlf_line_endings(tmp_path, write_dataset):
    write_dataset(tmp_path, "unix", GOOD)
    write_dataset(tmp_path, "dos", GOOD.replace("\n", "\r\n"))
    assert b"\r\n" in (tmp_path / "dos" / "dos.inter").read_bytes()
    unix, dos = load_dataset(tmp_path, "unix"), load_dataset(tmp_path, "dos")
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(dos.split(split), unix.split(split))


def test_crlf_error_line_numbers(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "ds", (HEADER + "0\t0\t5\t1\t0\n0\tx\t5\t1\t0\n").replace("\n", "\r\n"))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: itemID 'x' is not an integer")):
        read_inter(path)


def test_sizes_are_max_id_plus_one_over_all_splits(tmp_path, write_dataset):
    # item 6 appears only in valid, user 4 only in test (and is dropped): both still count for the sizes
    text = HEADER + "0\t0\t1\t1\t0\n1\t2\t1\t1\t0\n0\t6\t1\t1\t1\n4\t1\t1\t1\t2\n"
    write_dataset(tmp_path, "ds", text)
    ds = load_dataset(tmp_path, "ds")
    assert (ds.n_users, ds.n_items) == (5, 7)


def test_valid_and_test_rows_of_users_without_train_rows_are_dropped_and_counted(tmp_path, write_dataset):
    text = HEADER + (
        "0\t0\t1\t1\t0\n1\t1\t1\t1\t0\n"  # train: users 0, 1
        "0\t1\t1\t1\t1\n3\t0\t1\t1\t1\n3\t1\t1\t1\t1\n"  # valid: user 3 has no train row (2 rows dropped)
        "1\t0\t1\t1\t2\n2\t1\t1\t1\t2\n"  # test: user 2 has no train row (1 row dropped)
    )
    write_dataset(tmp_path, "ds", text)
    ds = load_dataset(tmp_path, "ds")
    assert ds.dropped == {"train": 0, "valid": 2, "test": 1}
    np.testing.assert_array_equal(ds.valid, [[0, 1]])
    np.testing.assert_array_equal(ds.test, [[1, 0]])
    assert ds.n_users == 4
    assert "3 valid/test rows of users without train rows dropped" in ds.summary()


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_features_are_cast_to_float32(tmp_path, write_dataset, dtype):
    values = np.array([[0.5, -1.0], [2.0, 0.25], [3.0, 4.0]])
    if dtype == np.int32:
        values = np.round(values)
    write_dataset(tmp_path, "ds", GOOD, {"f.npy": values.astype(dtype)})
    feat = load_dataset(tmp_path, "ds", {"image": "f.npy"}).features["image"]
    assert feat.dtype == np.float32 and feat.flags.c_contiguous
    np.testing.assert_array_equal(feat, values.astype(dtype).astype(np.float32))


def test_missing_inter_file(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'ds' / 'ds.inter'} does not exist; data sets in {tmp_path}: none")):
        load_dataset(tmp_path, "ds")


@pytest.mark.parametrize("column", ["userID", "itemID", "x_label"])
def test_missing_column(tmp_path, write_dataset, column):
    header = [c for c in ("userID", "itemID", "rating", "x_label") if c != column]
    path = write_dataset(tmp_path, "ds", "\t".join(header) + "\n" + "\t".join(["0"] * 3) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: missing column(s) {column}")):
        load_dataset(tmp_path, "ds")


@pytest.mark.parametrize(
    "line, problem",
    [("1.5\t0\t5\t1\t0", "userID '1.5' is not an integer"),
     ("abc\t0\t5\t1\t0", "userID 'abc' is not an integer"),
     ("1\t2.5\t5\t1\t0", "itemID '2.5' is not an integer"),
     ("1\tnan\t5\t1\t0", "itemID 'nan' is not an integer"),
     ("-1\t0\t5\t1\t0", "userID '-1' is negative"),
     ("1\t-3\t5\t1\t0", "itemID '-3' is negative"),
     ("1\t0\t5\t1\t3", "x_label '3' is not 0 (train), 1 (valid) or 2 (test)"),
     ("1\t0\t5\t1\tvalid", "x_label 'valid' is not an integer"),
     ("1\t0", "expected at least 5 tab-separated fields, got 2"),
     ("inf\t0\t5\t1\t0", "userID 'inf' is not an integer"),  # was an int64 overflow, then an IndexError
     ("1\t1e30\t5\t1\t0", "itemID '1e30' is far out of range"),
     ("9007199254740993\t0\t5\t1\t0", "userID '9007199254740993' is far out of range"),  # 2**53 + 1
     ("1_0\t0\t5\t1\t0", "userID '1_0' is not an integer"),  # Python's float() reads it, numpy does not
     ("1\tinfinity\t5\t1\t0", "itemID 'infinity' is not an integer")],
)
def test_bad_value_names_file_and_line(tmp_path, write_dataset, line, problem):
    # the bad row is the fourth data row: line 5 of the file (the header is line 1)
    text = HEADER + "0\t0\t5\t1\t0\n0\t1\t5\t1\t0\n1\t1\t5\t1\t1\n" + line + "\n2\t2\t5\t1\t0\n"
    path = write_dataset(tmp_path, "ds", text)
    with pytest.raises(DataError, match=re.escape(f"{path}:5: {problem}")):
        load_dataset(tmp_path, "ds")


def test_rating_and_timestamp_are_ignored_even_when_not_integers(tmp_path, write_dataset):
    write_dataset(tmp_path, "ds", HEADER + "0\t0\t4.5\t1.7e9\t0\n")
    np.testing.assert_array_equal(load_dataset(tmp_path, "ds").train, [[0, 0]])


def test_empty_train_split(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "ds", HEADER + "0\t0\t5\t1\t1\n1\t1\t5\t1\t2\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: the train split (x_label 0) is empty")):
        load_dataset(tmp_path, "ds")


@pytest.mark.filterwarnings("error")  # numpy's "input contained no data" once came before the error
def test_header_only_file_has_an_empty_train_split(tmp_path, write_dataset):
    path = write_dataset(tmp_path, "ds", HEADER + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: the train split (x_label 0) is empty: the file holds no "
                                                  "rows after its header")):
        load_dataset(tmp_path, "ds")


def test_feature_rows_must_match_n_items(tmp_path, write_dataset):
    write_dataset(tmp_path, "ds", GOOD, {"image_feat.npy": np.zeros((2, 4), np.float32),
                                         "text_feat.npy": np.zeros((3, 2), np.float32)})
    path = tmp_path / "ds" / "image_feat.npy"
    with pytest.raises(DataError, match=re.escape(f"{path}: has 2 rows but the data set has 3 items")):
        load_dataset(tmp_path, "ds", MODALITIES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, write_dataset, bad):
    feat = np.zeros((3, 4), np.float32)
    feat[1, 2] = bad
    write_dataset(tmp_path, "ds", GOOD, {"image_feat.npy": feat, "text_feat.npy": np.zeros((3, 2), np.float32)})
    path = tmp_path / "ds" / "image_feat.npy"
    with pytest.raises(DataError, match=re.escape(f"{path}: 1 row(s) hold NaN or inf values (first: row 1)")):
        load_dataset(tmp_path, "ds", MODALITIES)


@pytest.mark.filterwarnings("error")  # the cast to float32 once warned of an overflow, then said "NaN or inf"
def test_float64_features_beyond_float32_range(tmp_path, write_dataset):
    feat = np.zeros((3, 4))
    feat[2, 1] = -1e300
    write_dataset(tmp_path, "ds", GOOD, {"image_feat.npy": feat, "text_feat.npy": np.zeros((3, 2), np.float32)})
    path = tmp_path / "ds" / "image_feat.npy"
    with pytest.raises(DataError, match=re.escape(f"{path}: 1 row(s) hold values beyond float32's range of ±3.4e38 "
                                                  "(first: row 2, -1e+300)")):
        load_dataset(tmp_path, "ds", MODALITIES)
    feat[2, 1] = 3e38  # within float32's range: read
    np.save(path, feat)
    assert load_dataset(tmp_path, "ds", MODALITIES).features["image"][2, 1] == np.float32(3e38)


def test_repeated_pairs_are_a_warning_with_counts_by_split(tmp_path, write_dataset, capsys):
    write_dataset(tmp_path, "ds", GOOD)
    load_dataset(tmp_path, "ds")
    assert capsys.readouterr().err == ""
    # (0, 1) twice more in train, (1, 0) in train and in test: that test row can never be hit
    path = write_dataset(tmp_path, "ds", GOOD + "0\t1\t4\t106\t0\n0\t1\t4\t107\t0\n1\t0\t4\t108\t0\n")
    ds = load_dataset(tmp_path, "ds")
    assert len(ds.train) == 7 and len(ds.test) == 1  # warned, not dropped
    assert capsys.readouterr().err == (
        f"warning: {path}: repeated (userID, itemID) pairs: 2 extra row(s) within train, 1 test row(s) whose pair "
        "is also in train (train items are masked when scoring, so those rows are never hit)\n")
    write_dataset(tmp_path, "ds", GOOD + "1\t0\t2\t105\t2\n")
    load_dataset(tmp_path, "ds")
    assert capsys.readouterr().err.endswith("repeated (userID, itemID) pairs: 1 extra row(s) within test\n")


def test_modality_without_a_file(tmp_path, write_dataset):
    write_dataset(tmp_path, "ds", GOOD, {"image_feat.npy": np.zeros((3, 4), np.float32)})
    path = tmp_path / "ds" / "text_feat.npy"
    with pytest.raises(DataError, match=re.escape(f"{path}: feature file not found")):
        load_dataset(tmp_path, "ds", MODALITIES)


def test_feature_file_must_be_a_2d_numeric_npy(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'garbage.npy'}: not a readable .npy array")):
        load_features(tmp_path / "garbage.npy", 3)
    np.save(tmp_path / "flat.npy", np.zeros(3, np.float32))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'flat.npy'}: expected a 2-d array")):
        load_features(tmp_path / "flat.npy", 3)
    np.save(tmp_path / "text.npy", np.array([["a"], ["b"], ["c"]]))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'text.npy'}: dtype <U1 is not numeric")):
        load_features(tmp_path / "text.npy", 3)


def test_a_feature_header_promising_more_than_the_file_holds_is_not_allocated(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:  # (3, 10**12) float32 would be 12 TB; the file holds 100 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (3, 10**12)})
        f.write(bytes(100))
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable .npy array (the file is shorter than its "
                                                  "header's shape says)")):
        load_features(path, 3)
    np.save(path, np.zeros((3, 0), np.float32))
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a 2-d array (n_items, dim >= 1), got shape (3, 0)")):
        load_features(path, 3)
    np.save(path, np.ones((3, 2), np.float32))
    feat = load_features(path, 3)
    assert type(feat) is np.ndarray and feat.flags.writeable and feat.flags.c_contiguous  # a copy, not a map


def test_utf8_bom_before_the_header_is_read(tmp_path):
    from msi.data.dataset import read_inter

    path = tmp_path / "bom.inter"
    path.write_bytes("\ufeffuserID\titemID\tx_label\n0\t1\t0\n1\t0\t2\n".encode("utf-8"))
    users, items, labels = read_inter(path)
    assert users.tolist() == [0, 1] and items.tolist() == [1, 0] and labels.tolist() == [0, 2]


def test_a_missing_paper_data_set_points_to_the_readme_section(tmp_path):
    from msi.config import load_config
    from msi.runtime import dataset_for

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "baby.yaml", [f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="see the README's 'Using MMRec's data': data.root=PATH"):
        dataset_for(cfg)

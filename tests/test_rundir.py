"""msi/rundir.py: the run files, the lock, and one rule for partial and damaged run-directory files."""

from __future__ import annotations

import json
import os

import pytest

import msi.rundir
from msi.config import load_config
from msi.errors import ConfigError, MSIError
from msi.rundir import (DamagedRunFile, append_log, append_metrics, check_new_run_dir, locked,
                        loss_terms, read_config, read_env, read_log, read_metrics, read_results, record_env,
                        remove_files, remove_leftovers, truncate_metrics, unstarted_run, write_config,
                        write_results)

RESULTS = {"best_epoch": 3, "epochs_run": 5, "valid": {"recall@20": 0.5}, "test": {"recall@20": 0.4},
           "train_seconds": 1.5, "selected_by": "valid recall@20", "run_dir": "/runs/a"}
ROWS = '{"loss": 1.0, "rec": 0.5, "epoch": 1, "terms": ["loss", "rec"]}\n{"loss": 0.9, "rec": 0.4, "epoch": 2}\n'


def only_file(folder):
    return sorted(p.name for p in folder.iterdir())


def test_metrics_rows_name_their_loss_terms(tmp_path):
    append_metrics(tmp_path, {"loss": 1.0, "rec": 0.5, "epoch": 1, "grad_id": 0.2}, ["loss", "rec"])
    (row,) = read_metrics(tmp_path)
    assert row == {"loss": 1.0, "rec": 0.5, "epoch": 1, "grad_id": 0.2, "terms": ["loss", "rec"]}
    assert loss_terms(row) == ["loss", "rec"]
    assert loss_terms({"loss": 1.0, "nce": 2.0, "epoch": 1, "grad_id": 0.2}) == ["loss", "nce"]  # older rows
    with pytest.raises(ValueError, match="align"):
        append_metrics(tmp_path, {"loss": 1.0, "epoch": 2}, ["loss", "align"])


def test_train_log_lines_are_appended_with_their_time_and_read_on_from_an_offset(tmp_path):
    assert read_log(tmp_path) == ("", 0)
    append_log(tmp_path, "epoch 1: loss=0.5")
    text, offset = read_log(tmp_path)
    assert text.endswith(" epoch 1: loss=0.5\n") and text[:4].isdigit() and offset == len(text)
    append_log(tmp_path, "epoch 2: loss=0.4")
    with open(tmp_path / "train.log", "a") as f:
        f.write("partial")
    more, end = read_log(tmp_path, offset)
    assert more.endswith(" epoch 2: loss=0.4\n") and "partial" not in more and end == offset + len(more)


def test_env_json_keeps_the_first_record_reads_an_older_single_record_and_names_a_damaged_one(tmp_path):
    assert read_env(tmp_path) is None
    record_env(tmp_path, {"command": ["a"]}, resumed=False)
    record_env(tmp_path, {"command": ["b"]}, resumed=True)
    assert read_env(tmp_path) == {"first": {"command": ["a"]}, "resumes": [{"command": ["b"]}]}
    (tmp_path / "env.json").write_text('{"command": ["old"], "host": "h"}')  # one record, as msi wrote before
    record_env(tmp_path, {"command": ["c"]}, resumed=True)
    assert read_env(tmp_path) == {"first": {"command": ["old"], "host": "h"}, "resumes": [{"command": ["c"]}]}
    (tmp_path / "env.json").write_text('{"first": {}, "resu')
    with pytest.raises(DamagedRunFile, match=f"^{tmp_path / 'env.json'}: damaged, not JSON"):
        read_env(tmp_path)


def test_config_is_written_and_read_back_as_a_validated_config(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "eval.ks=[5,20]"])
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg
    (tmp_path / "config.yaml").write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'config.yaml'}: unknown config key 'train.epoch'"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "none")


# ---------------------------------------------------------------- reading: partial and damaged files


def test_results_missing_is_none_and_complete_is_read(tmp_path):
    assert read_results(tmp_path) is None
    write_results(tmp_path, RESULTS)
    assert read_results(tmp_path) == RESULTS


@pytest.mark.parametrize("text, why", [
    (json.dumps(RESULTS)[:40], "not JSON"),
    (json.dumps({**RESULTS, "valid": {"recall@20": float("nan")}}), "valid recall@20 is nan, not a finite number"),
    (json.dumps({k: v for k, v in RESULTS.items() if k not in ("best_epoch", "test")}), "missing best_epoch, test"),
    (json.dumps({**RESULTS, "best_epoch": 2.5}), "best_epoch is 2.5, not a whole number"),
    (json.dumps({**RESULTS, "test": [0.4]}), "test is not a mapping"),
    ("[]", "not a JSON object"),
    ("", "not JSON"),
])
def test_damaged_results_are_one_error_naming_the_file(tmp_path, text, why):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(DamagedRunFile) as err:
        read_results(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'results.json'}: damaged, {why}")
    assert "\n" not in str(err.value)


def test_metrics_skip_a_partial_last_line_and_name_a_damaged_one(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text(ROWS + '{"loss": 0.8, "ep')
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text(ROWS + '{"loss": 0.8, "epoch": 3}')  # whole, but no newline yet
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1.0, "epoch": 1}\n{"lo\n{"loss": 0.8, "epoch": 3}\n')
    with pytest.raises(DamagedRunFile, match=f"^{tmp_path / 'metrics.jsonl'}:2: damaged, not a JSON row"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(DamagedRunFile, match=":1: damaged, a row without its epoch"):
        read_metrics(tmp_path)


def test_truncating_metrics_keeps_the_rows_last_pt_holds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(ROWS + '{"loss": 0.8, "epoch": 3}\n{"loss": 0.7, "ep')
    assert truncate_metrics(tmp_path, 2) == 2  # epoch 3's row and the partial line
    assert path.read_text() == ROWS
    mtime = path.stat().st_mtime_ns
    assert truncate_metrics(tmp_path, 2) == 0 and path.stat().st_mtime_ns == mtime  # nothing to drop: not rewritten
    assert truncate_metrics(tmp_path / "none", 2) == 0


# ---------------------------------------------------------------- the directory


def test_lock_refuses_a_second_holder_and_is_removed_when_the_run_ends(tmp_path):
    run = tmp_path / "run"
    with locked(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(MSIError, match=f"{run}: in use by another live msi-train process \\(pid {os.getpid()}\\)"):
            with locked(run):
                pass
        assert (run / ".lock").is_file()  # the refused one leaves the holder's lock alone
    assert not run.exists()  # made by the lock and left empty: removed with it
    run.mkdir()
    with pytest.raises(RuntimeError):
        with locked(run):
            raise RuntimeError("the run failed")
    assert only_file(run) == []  # a folder that was there stays


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("999999\n")  # no process holds it: a kill -9 leaves this
    with locked(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert only_file(tmp_path) == []


def test_a_lock_file_removed_while_waiting_for_it_is_not_trusted(tmp_path, monkeypatch):
    real_fstat, calls = os.fstat, []

    def as_if_its_holder_removed_it(fd):
        calls.append(fd)
        if len(calls) == 1:  # the file this process opened is gone from the folder: another inode
            return os.stat_result((0, -1) + tuple(real_fstat(fd))[2:])
        return real_fstat(fd)

    monkeypatch.setattr(msi.rundir.os, "fstat", as_if_its_holder_removed_it)
    with locked(tmp_path):
        assert len(calls) == 2


def test_a_new_run_refuses_files_unless_overwrite_and_never_removes_foreign_ones(tmp_path):
    assert check_new_run_dir(tmp_path, overwrite=False) == []
    for name in ("results.json", "train.log", ".best.pt.tmp-12"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(MSIError, match="already holds .best.pt.tmp-12, results.json, tensorboard, train.log; pass "
                                       "--resume"):
        check_new_run_dir(tmp_path, overwrite=False)
    present = check_new_run_dir(tmp_path, overwrite=True)
    assert present == [".best.pt.tmp-12", "results.json", "tensorboard", "train.log"]
    assert len(only_file(tmp_path)) == 4  # checking removes nothing
    remove_files(tmp_path, present)
    assert only_file(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MSIError, match="did not write \\(notes.txt\\)"):
        check_new_run_dir(tmp_path, overwrite=True)
    assert only_file(tmp_path) == ["notes.txt"]


def test_an_unstarted_run_is_one_without_an_epoch_row_or_a_checkpoint(tmp_path):
    assert unstarted_run(tmp_path) == []
    for name in ("config.yaml", "metrics.jsonl", "env.json", "train.log", ".lock"):
        (tmp_path / name).write_text("")
    (tmp_path / "tensorboard").mkdir()
    assert unstarted_run(tmp_path) == ["config.yaml", "env.json", "metrics.jsonl", "tensorboard", "train.log"]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert unstarted_run(tmp_path) is None  # an epoch's row
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "best.pt").write_text("x")
    assert unstarted_run(tmp_path) is None


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    for name in (".best.pt.tmp-12", ".results.json.tmp-12-ab12cd34", "best.pt", ".lock"):
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == [".best.pt.tmp-12", ".results.json.tmp-12-ab12cd34"]
    assert only_file(tmp_path) == [".lock", "best.pt"]


def test_a_failed_append_names_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # what cannot be appended to, as a full disk cannot
    with pytest.raises(MSIError, match=f"^{tmp_path / 'metrics.jsonl'}: could not append"):
        append_metrics(tmp_path, {"loss": 1.0, "epoch": 1}, ["loss"])

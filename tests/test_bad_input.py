"""The hostile-user catalogue, case by case, through the command-line functions on generated ``tiny`` data.

Each case: the exit status, a one-line ``error: ...`` that names the file or key (no traceback), and nothing that
was saved before is lost or misreported. The numbers are those of the catalogue once in the README; its summary is
now docs/run_directories.md's "Bad input". ``test_26_N`` are the defects of issue 26 (a refused resume changes
nothing, a file a tool did not write is never replaced, ...), and ``test_26_classes_*`` keep its promises for whole
classes of input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import msi.models
import msi.recommend
import msi.rundir
import msi.train
from msi.checkpoint import load_checkpoint, save_checkpoint
from msi.cli import data_main, eval_main, recommend_main, train_main
from msi.errors import CheckpointError

EPOCHS = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """``tiny.yaml`` (data generated on first use into ``data/tiny``) and a finished run ``runs/done``."""
    d = tmp_path_factory.mktemp("bad")
    (d / "tiny.yaml").write_text(
        "data:\n  root: data\n  name: tiny\n  synth_preset: tiny\nmodel:\n  embedding_dim: 8\n"
        f"train:\n  epochs: {EPOCHS}\n  device: cpu\n  out_dir: runs\neval:\n  ks: [10, 20]\n"
    )
    assert train_main(["--config", str(d / "tiny.yaml"), "--quiet", "--out", str(d / "runs" / "done")]) == 0
    return d


def run(main, argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one line of stderr, which must be an ``error: ...`` line (warnings may precede it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines()  # progress bars draw with \r
             if line.strip() and not line.startswith("warning: ") and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def copy_data(workdir: Path, tmp_path: Path, name: str = "tiny") -> Path:
    """A private copy of the tiny data set as ``<tmp>/data/<name>``; returns the data root."""
    shutil.copytree(workdir / "data" / "tiny", tmp_path / "data" / name)
    if name != "tiny":
        (tmp_path / "data" / name / "tiny.inter").rename(tmp_path / "data" / name / f"{name}.inter")
    return tmp_path / "data"


def train_args(workdir: Path, out: Path, *overrides: str) -> list:
    return ["--config", workdir / "tiny.yaml", "--quiet", "--out", out, *overrides]


# ---------------------------------------------------------------- 1. a run directory is never clobbered


def test_1_a_finished_run_directory_is_refused_without_resume_or_overwrite(workdir, capsys):
    done = workdir / "runs" / "done"
    before = snapshot(done)
    code, _, err = run(train_main, train_args(workdir, done, "model.n_layers=2"), capsys)
    line = error_line(err)
    assert code == 2 and str(done) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(done) == before


def test_1_overwrite_starts_over_and_refuses_files_msi_did_not_write(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "done", out)
    assert run(train_main, train_args(workdir, out, "train.epochs=1", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 1
    (out / "notes.txt").write_text("mine")
    code, _, err = run(train_main, train_args(workdir, out, "--overwrite"), capsys)
    assert code == 2 and "notes.txt" in error_line(err)
    assert (out / "notes.txt").read_text() == "mine"


def test_1_a_run_that_fails_before_its_first_epoch_leaves_nothing(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out, "data.name=nope"), capsys)  # a missing data set
    assert code == 2 and "nope.inter does not exist" in error_line(err) and not out.exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # a missing extra
    code, _, err = run(train_main, train_args(workdir, out, "train.tensorboard=true"), capsys)
    assert code == 2 and "pip install -e '.[tensorboard]'" in error_line(err) and not out.exists()
    out.mkdir()  # a folder the user made stays, as empty as it was
    assert run(train_main, train_args(workdir, out, "train.tensorboard=true"), capsys)[0] == 2
    assert list(out.iterdir()) == []
    assert run(train_main, train_args(workdir, out, "train.epochs=1"), capsys)[0] == 0  # the corrected command


def test_1_what_an_unstarted_run_left_does_not_block_a_new_one(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("config.yaml", "train: {epochs: 9}\n"), ("metrics.jsonl", ""), ("env.json", "{}\n"),
                       ("train.log", "a line\n")):  # what a run failing at its start left before
        (out / name).write_text(text)
    assert run(train_main, train_args(workdir, out, "train.epochs=1"), capsys)[0] == 0
    assert f"removed config.yaml, env.json, metrics.jsonl, train.log from {out}\n" in (out / "train.log").read_text()
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 1


def test_1_a_second_live_process_on_a_run_directory_is_refused(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another live process holding the run's lock, as a running msi-train does
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(train_main, train_args(workdir, out), capsys)
        line = error_line(err)
        assert code == 2 and str(out) in line and "another live msi-train process" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.kill(holder.pid, signal.SIGTERM)
        holder.wait()
    assert run(train_main, train_args(workdir, out, "train.epochs=1"), capsys)[0] == 0  # the lock died with it


# ---------------------------------------------------------------- 2. a NaN model never passes for a result


def test_2_non_finite_weights_stop_the_run_before_any_checkpoint(workdir, tmp_path, capsys, monkeypatch):
    real_epoch = msi.train.run_epoch

    def epoch_that_breaks_the_weights(model, *args, **kwargs):
        row = real_epoch(model, *args, **kwargs)
        with torch.no_grad():
            model.user_emb.fill_(float("nan"))  # what train.lr=.inf did to every weight
        return row

    monkeypatch.setattr(msi.train, "run_epoch", epoch_that_breaks_the_weights)
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out), capsys)
    line = error_line(err)
    assert code == 2 and "NaN or inf in epoch 1" in line and "user_emb" in line
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert not (out / "results.json").exists()


def test_2_an_infinite_lr_is_refused_at_config_time(workdir, tmp_path, capsys):
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", "train.lr=.inf"), capsys)
    assert code == 2 and "train.lr" in error_line(err)


def test_2_eval_and_recommend_refuse_a_checkpoint_with_nan_weights(workdir, tmp_path, capsys):
    ckpt = load_checkpoint(workdir / "runs" / "done" / "best.pt")
    ckpt["model"]["user_emb"].fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    for main, extra in ((eval_main, []), (recommend_main, ["--out", tmp_path / "recs.tsv"])):
        code, out, err = run(main, ["--checkpoint", tmp_path / "nan.pt", "--device", "cpu", *extra], capsys)
        line = error_line(err)
        assert code == 2 and "nan.pt" in line and "NaN or inf" in line and out == ""
    assert not (tmp_path / "recs.tsv").exists()


# ---------------------------------------------------------------- 3. a checkpoint is tied to its data


def test_3_a_same_shape_checkpoint_from_other_data_is_refused(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    valid = next(k for k, line in enumerate(lines) if line.endswith("\t1"))
    lines[valid] = lines[valid][:-1] + "2"  # one valid row becomes a test row: same sizes, other data
    inter.write_text("\n".join(lines) + "\n")
    ckpt = load_checkpoint(workdir / "runs" / "done" / "best.pt")
    ckpt["config"]["data"]["root"] = str(root)
    save_checkpoint(tmp_path / "moved.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    argv = ["--checkpoint", tmp_path / "moved.pt", "--device", "cpu"]
    code, _, err = run(eval_main, argv, capsys)
    line = error_line(err)
    assert code == 2 and "moved.pt" in line and "other data of the same shape" in line and "--allow-other-data" in line
    assert run(eval_main, argv + ["--allow-other-data"], capsys)[0] == 0


def test_3_resume_on_changed_data_is_a_one_line_error(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "done", out)
    (out / "results.json").unlink()
    last = load_checkpoint(out / "last.pt")
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.split("\t")[0] != "59"]) + "\n")
    last["config"]["data"]["root"] = str(root)
    save_checkpoint(out / "last.pt", {k: v for k, v in last.items() if k not in ("format", "format_version")})
    before = snapshot(out)
    code, _, err = run(train_main, ["--resume", out, "--quiet"], capsys)
    assert code == 2 and "trained on 60 users" in error_line(err) and "last.pt" in error_line(err)
    assert snapshot(out) == before


# ---------------------------------------------------------------- 4. data files


def test_4a_a_mistyped_data_set_name_is_not_generated(workdir, tmp_path, capsys):
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", "data.name=tinyy"), capsys)
    line = error_line(err)
    assert code == 2 and "tinyy.inter does not exist" in line and ": tiny (for MMRec's" in line
    assert not (workdir / "data" / "tinyy").exists()


def test_4_an_id_far_out_of_range_names_file_and_line(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    lines[3] = "99999999\t" + lines[3].split("\t", 1)[1]
    inter.write_text("\n".join(lines) + "\n")
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    line = error_line(err)
    assert code == 2 and f"{inter}:4: userID 99999999 is far out of range" in line and "from 0" in line


def test_4b_files_that_are_not_utf8(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    inter.write_bytes(inter.read_bytes().replace(b"\n", b"\n\xff", 1))
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and f"{inter}:2: not UTF-8" in error_line(err)
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"train:\n  run_name: caf\xe9\n")
    code, _, err = run(train_main, ["--config", config], capsys)
    assert code == 2 and f"{config}:2: not UTF-8" in error_line(err)
    users = tmp_path / "users.txt"
    users.write_bytes(b"1\n\xfe2\n")
    code, _, err = run(recommend_main, ["--checkpoint", workdir / "runs" / "done" / "best.pt", "--users", users,
                                        "--out", tmp_path / "r.tsv", "--device", "cpu"], capsys)
    assert code == 2 and f"{users}:2: not UTF-8" in error_line(err)


def test_5_an_empty_valid_split_is_refused_before_training(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(x for x in lines if not x.endswith("\t1")) + "\n")
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out, f"data.root={root}"), capsys)
    line = error_line(err)
    assert code == 2 and str(inter) in line and "valid split is empty" in line
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 6. config values rejected at load time


@pytest.mark.parametrize("override, key", [
    ("train.metric=recall@50", "train.metric"), (f"train.seed={2**80}", "train.seed"), ("train.lr=1e38", "train.lr"),
    ("loss.alpha=nan", "loss.alpha"),
])
def test_6_impossible_config_values(workdir, tmp_path, capsys, override, key):
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", override), capsys)
    assert code == 2 and key in error_line(err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 7, 8. checkpoints


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"{}", b"\x80\x02}q\x00."])
def test_7_a_file_that_is_not_a_checkpoint(tmp_path, capsys, content):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    code, _, err = run(eval_main, ["--checkpoint", path, "--device", "cpu"], capsys)
    line = error_line(err)
    assert code == 2 and str(path) in line and "not" in line and "pickled objects" not in line


def test_8_a_full_disk_while_a_checkpoint_is_written(tmp_path):
    resource = pytest.importorskip("resource")
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}})
    before = path.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: could not write the checkpoint")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


# ---------------------------------------------------------------- 9, 12, 14. resume


def killed_copy(workdir: Path, tmp_path: Path) -> Path:
    """The finished run as it was before its finish step: no results.json."""
    out = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "done", out)
    (out / "results.json").unlink()
    return out


def test_9_a_partial_last_metrics_line_is_dropped_on_resume(workdir, tmp_path, capsys):
    out = killed_copy(workdir, tmp_path)
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + '{"rec": 0.69, "al')
    assert run(train_main, ["--resume", out, "--quiet"], capsys)[0] == 0
    assert (out / "metrics.jsonl").read_text() == rows


def test_12_leftovers_of_interrupted_writes_are_removed(workdir, tmp_path, capsys, monkeypatch):
    out = killed_copy(workdir, tmp_path)
    (out / ".best.pt.tmp-12345").write_bytes(b"partial")
    (out / ".last.pt.tmp-12345").write_bytes(b"partial")
    assert run(train_main, ["--resume", out, "--quiet"], capsys)[0] == 0
    written = set(msi.rundir.RUN_FILES) - {"tensorboard", "stopped.json"}  # TensorBoard is off; no sweep stopped it
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # and .lock is gone with the process

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("msi.recommend._write_rows", disk_full)
    recs = tmp_path / "recs.tsv"
    code, _, err = run(recommend_main, ["--checkpoint", out / "best.pt", "--out", recs, "--device", "cpu"], capsys)
    line = error_line(err)
    assert code == 2 and str(recs) in line and "No space left" in line
    assert [p.name for p in tmp_path.iterdir() if "recs.tsv" in p.name] == []  # no temporary file either


def test_14_ctrl_c_exits_130_and_says_how_to_resume(workdir, tmp_path, capsys, monkeypatch):
    real_epoch, calls = msi.train.run_epoch, []

    def interrupted(*args, **kwargs):  # Ctrl-C in the second epoch, after last.pt holds the first
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(msi.train, "run_epoch", interrupted)
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out), capsys)
    assert code == 130 and f"--resume {out}" in error_line(err)


def test_14_ctrl_c_in_the_first_epoch_leaves_nothing_and_says_to_start_again(workdir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(msi.train, "run_epoch", interrupted)
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out), capsys)
    assert code == 130 and error_line(err) == (f"error: interrupted before {out / 'last.pt'} was first written, so "
                                               "there is nothing to resume: start the run again")
    assert not out.exists()


def test_14_resuming_a_finished_run_changes_nothing(workdir, capsys):
    done = workdir / "runs" / "done"
    before = snapshot(done)
    code, out, _ = run(train_main, ["--resume", done, "--quiet"], capsys)
    assert code == 0 and out.startswith(f"{done}: best epoch ")
    assert snapshot(done) == before


def test_14_resuming_an_early_stopped_run_trains_no_more_epochs(workdir, tmp_path, capsys):
    out = tmp_path / "es"
    assert run(train_main, train_args(workdir, out, "train.epochs=50", "train.patience=1"), capsys)[0] == 0
    epochs = json.loads((out / "results.json").read_text())["epochs_run"]
    assert epochs < 50
    (out / "results.json").unlink()  # killed after the last epoch, before the finish step
    assert run(train_main, ["--resume", out, "--quiet"], capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["epochs_run"] == epochs
    assert len((out / "metrics.jsonl").read_text().splitlines()) == epochs


def test_14_duplicate_keys_in_yaml_and_overrides_warn(workdir, tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text(f"data: {{root: {workdir / 'data'}, name: tiny}}\nmodel: {{embedding_dim: 8}}\n"
                      "train:\n  epochs: 3\n  epochs: 1\n  device: cpu\n")
    code, _, err = run(train_main, ["--config", config, "--quiet", "--out", tmp_path / "run", "train.lr=0.01",
                                    "train.lr=0.02"], capsys)
    assert code == 0
    assert f"warning: {config}:5: key 'epochs' is given twice; the last value is used" in err
    assert "warning: override train.lr is given twice ('0.01', then '0.02'); the last is used" in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs_run"] == 1


# ---------------------------------------------------------------- 10. bf16 autocast on the CPU


def test_10_bf16_autocast_trains_on_the_cpu(workdir, tmp_path, capsys):
    code, out, err = run(train_main, train_args(workdir, tmp_path / "run", "train.epochs=1", "train.autocast=bf16"),
                         capsys)
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "run" / "results.json").read_text())["test"]["recall@20"] <= 1


# ---------------------------------------------------------------- 11, 13, 15. prepare, recommend, overrides


def test_11_a_failed_prepare_overwrite_leaves_the_old_data_set_whole(tmp_path, capsys, monkeypatch):
    reviews = tmp_path / "reviews.json"
    reviews.write_text("".join(json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t}) + "\n"
                               for t, (u, i) in enumerate((u, i) for u in "ABCD" for i in ("I1", "I2", "I3"))))
    meta = tmp_path / "meta.json"
    meta.write_text("".join(json.dumps({"asin": i, "title": f"item {i}"}) + "\n" for i in ("I1", "I2", "I3")))
    monkeypatch.setattr("msi.data.prepare.minilm_encoder",
                        lambda: lambda texts: np.ones((len(texts), 3), dtype=np.float32))
    argv = ["prepare", "--reviews", reviews, "--meta", meta, "--name", "toy", "--out", tmp_path / "data",
            "--k-core", "1", "--no-progress"]
    assert run(data_main, argv, capsys)[0] == 0
    before = snapshot(tmp_path / "data" / "toy")
    real_save = np.save

    def disk_full_at_the_features(path, arr, *args, **kwargs):
        real_save(path, arr[: len(arr) // 2])
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("msi.data.prepare.np.save", disk_full_at_the_features)
    code, _, err = run(data_main, [*argv, "--seed", "1", "--overwrite"], capsys)
    assert code == 2 and "text_feat.npy" in error_line(err)
    assert snapshot(tmp_path / "data" / "toy") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]


def test_13_recommend_reports_the_rows_it_wrote(workdir, tmp_path, capsys):
    recs = tmp_path / "recs.tsv"
    code, out, _ = run(recommend_main, ["--checkpoint", workdir / "runs" / "done" / "best.pt", "--k", 100000,
                                        "--out", recs, "--device", "cpu"], capsys)
    n_rows = len(recs.read_text().splitlines()) - 1
    assert code == 0 and n_rows < 60 * 40
    assert out.strip() == f"wrote {n_rows} rows for 60 users (at most 100000 items each) to {recs}"


def test_15_string_overrides_keep_their_text(workdir, tmp_path, capsys):
    code, _, _ = run(train_main, ["--config", workdir / "tiny.yaml", "--quiet", "train.epochs=1",
                                  f"train.out_dir={tmp_path}", "train.run_name=0x1F"], capsys)
    assert code == 0 and (tmp_path / "0x1F" / "results.json").is_file()
    code, _, err = run(train_main, train_args(workdir, tmp_path / "r2", "data.name=007"), capsys)
    assert code == 2 and "007/007.inter does not exist" in error_line(err)


# ---------------------------------------------------------------- issue 19: the newer surfaces (its item numbers)


def done_copy(workdir: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run ``runs/done``."""
    shutil.copytree(workdir / "runs" / "done", tmp_path / "done")
    return tmp_path / "done"


def recommend_args(checkpoint: Path, out: Path, *extra) -> list:
    return ["--checkpoint", checkpoint, "--out", out, "--device", "cpu", *extra]


@pytest.mark.parametrize("target", ["best.pt", "last.pt", "results.json", "metrics.jsonl", ".",
                                    "../data/tiny/tiny.inter"])
def test_i19_1_recommend_never_writes_over_a_checkpoint_a_run_file_or_data(workdir, tmp_path, capsys, target):
    done = done_copy(workdir, tmp_path)
    copy_data(workdir, tmp_path)
    out = done / target
    before = {**snapshot(done), **snapshot(tmp_path / "data" / "tiny")}
    code, stdout, err = run(recommend_main, recommend_args(done / "best.pt", out), capsys)
    line = error_line(err)
    problem = "is a folder, not a file" if target == "." else "exists and was not written by msi-recommend"
    assert code == 2 and stdout == "" and line.startswith(f"error: {out}: {problem}")
    assert {**snapshot(done), **snapshot(tmp_path / "data" / "tiny")} == before


def test_i19_1_an_earlier_recommendations_tsv_is_replaced(workdir, tmp_path, capsys):
    best, recs = workdir / "runs" / "done" / "best.pt", tmp_path / "recs.tsv"
    for k in (5, 2):
        assert run(recommend_main, recommend_args(best, recs, "--k", k), capsys)[0] == 0
    assert len(recs.read_text().splitlines()) == 1 + 2 * 60


def test_i19_2_two_recommends_to_one_out_leave_one_whole_file(workdir, tmp_path, capsys, monkeypatch):
    """A second msi-recommend (--k 7) runs from start to end while the first (--k 3) is half-way through its rows:
    each writes its own temporary file and renames it when complete, so the file is one whole output, never a mix."""
    best, recs = workdir / "runs" / "done" / "best.pt", tmp_path / "recs.tsv"
    real, codes = msi.recommend._write_rows, []

    def second_run_meanwhile(*args):
        if not codes:  # the first batch of the first run
            codes.append(None)
            codes[0] = recommend_main([str(a) for a in recommend_args(best, recs, "--k", 7)])
        return real(*args)

    monkeypatch.setattr(msi.recommend, "_write_rows", second_run_meanwhile)
    code, _, err = run(recommend_main, recommend_args(best, recs, "--k", 3), capsys)
    assert code == 0 and codes == [0], err
    rows = [line.split("\t") for line in recs.read_text().splitlines()[1:]]
    assert len(rows) == 3 * 60 and {r[1] for r in rows} == {"1", "2", "3"} and {len(r) for r in rows} == {4}
    assert [p.name for p in tmp_path.iterdir()] == ["recs.tsv"]


def test_i19_3_synth_into_an_existing_data_set_is_refused_without_overwrite(workdir, tmp_path, capsys):
    folder = copy_data(workdir, tmp_path) / "tiny"
    before = snapshot(folder)
    argv = ["synth", "--preset", "tiny", "--out", folder, "--seed", "1", "--quiet"]
    code, _, err = run(data_main, argv, capsys)
    assert code == 2 and error_line(err) == (f"error: {folder}: already holds image_feat.npy, text_feat.npy, "
                                             "tiny.inter; msi-data synth --overwrite replaces the data set there")
    assert snapshot(folder) == before
    assert run(data_main, [*argv, "--overwrite"], capsys)[0] == 0
    after = snapshot(folder)
    assert sorted(after) == sorted(before) and all(after[f] != before[f] for f in before)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # written beside, swapped in, nothing left


@pytest.mark.parametrize("raw, problem", [("inf", "is not an integer"), ("1e30", "is far out of range"),
                                          ("1.5", "is not an integer"), ("-0.5", "is not an integer"),
                                          ("1_0", "is not an integer")])
def test_i19_9_ids_that_are_not_integers_name_the_line(workdir, tmp_path, capsys, raw, problem):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    lines[3] = raw + "\t" + lines[3].split("\t", 1)[1]
    inter.write_text("\n".join(lines) + "\n")
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and error_line(err).startswith(f"error: {inter}:4: userID {raw!r} {problem}")


def malformed(ckpt: dict, change: str) -> dict:
    """``ckpt`` with one thing wrong, as a loaded payload (torch.save it: save_checkpoint would fix the header)."""
    ckpt = {**ckpt, "model": dict(ckpt["model"])}
    if change == "model missing a tensor":
        del ckpt["model"]["user_emb"]
    elif change == "model of the wrong shape":
        ckpt["model"]["user_emb"] = torch.zeros(3, 8)
    else:
        key, value = {"format_version a string": ("format_version", "1"),
                      "format_version None": ("format_version", None), "data empty": ("data", {}),
                      "config a string": ("config", "train: {epochs: 2}"),
                      "model a list": ("model", [torch.zeros(2)])}[change]
        ckpt[key] = value
    return ckpt


@pytest.mark.parametrize("change, problem", [
    ("format_version a string", "format_version is '1', not a positive integer"),
    ("format_version None", "format_version is None, not a positive integer"),
    ("data empty", "data has no n_users"),
    ("config a string", "config is a str, not a mapping"),
    ("model a list", "model is a list, not a mapping"),
    ("model missing a tensor", "model has no weight 'user_emb'"),
    ("model of the wrong shape", "model weight 'user_emb' is torch.float32 of shape (3, 8), its config's model needs "
                                 "torch.float32 of shape (60, 8)"),
])
def test_i19_10_a_malformed_checkpoint_is_one_line(workdir, tmp_path, capsys, change, problem):
    path = tmp_path / "bad.pt"
    torch.save(malformed(load_checkpoint(workdir / "runs" / "done" / "best.pt"), change), path)
    for main, extra in ((eval_main, []), (recommend_main, ["--out", tmp_path / "recs.tsv"])):
        code, out, err = run(main, ["--checkpoint", path, "--device", "cpu", *extra], capsys)
        assert code == 2 and out == "" and error_line(err) == f"error: {path}: not an msi checkpoint: {problem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_i19_10_a_half_size_checkpoint_says_truncated(workdir, tmp_path, capsys):
    path = tmp_path / "best.pt"
    data = (workdir / "runs" / "done" / "best.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, _, err = run(eval_main, ["--checkpoint", path, "--device", "cpu"], capsys)
    assert code == 2 and error_line(err).startswith(f"error: {path}: truncated checkpoint: the zip archive stops")


@pytest.fixture
def small_file_limit():
    """A context: inside it, writes past 8 KiB fail with EFBIG ("File too large"), as on a full disk. The limit
    binds the whole process, pytest's own report included (a dot written to a log file past 8 KiB fails the
    session), so it holds only inside the ``with`` block, never while pytest reports."""
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    @contextmanager
    def limit() -> Iterator[None]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, limits[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    yield limit
    signal.signal(signal.SIGXFSZ, old_handler)


def test_i19_12_a_full_disk_while_synth_writes_names_the_file_and_keeps_the_data_set(workdir, tmp_path, capsys,
                                                                                    small_file_limit):
    folder = copy_data(workdir, tmp_path) / "tiny"
    before = snapshot(folder)
    with small_file_limit():
        code, _, err = run(data_main, ["synth", "--preset", "tiny", "--out", folder, "--seed", "1", "--overwrite",
                                       "--quiet"], capsys)
    assert code == 2 and error_line(err) == (f"error: {folder / 'tiny.inter'}: could not write (File too large); "
                                             f"{folder} is left as it was")
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # no staging folder, no 0-byte file


def test_i19_12_a_full_disk_while_recommend_writes_keeps_the_earlier_file(workdir, tmp_path, capsys,
                                                                         small_file_limit):
    best, recs = workdir / "runs" / "done" / "best.pt", tmp_path / "recs.tsv"
    assert run(recommend_main, recommend_args(best, recs, "--k", 1), capsys)[0] == 0
    before = recs.read_bytes()
    with small_file_limit():
        code, _, err = run(recommend_main, recommend_args(best, recs, "--k", 40), capsys)
    assert code == 2 and error_line(err) == (f"error: {recs}: could not write the recommendations (File too large); "
                                             "the earlier file, if any, is kept")
    assert recs.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["recs.tsv"]


def test_i19_13_eval_every_above_epochs_is_refused_at_config_time(workdir, tmp_path, capsys):
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"train.eval_every={EPOCHS + 1}"), capsys)
    assert code == 2 and error_line(err).startswith(
        f"error: config key 'train.eval_every' must be <= train.epochs ({EPOCHS}), or valid is never scored")
    assert not (tmp_path / "run").exists()


def test_i19_13_resuming_a_run_whose_best_checkpoint_was_deleted_says_so(workdir, tmp_path, capsys):
    out = killed_copy(workdir, tmp_path)
    best_epoch = json.loads((workdir / "runs" / "done" / "results.json").read_text())["best_epoch"]
    (out / "best.pt").unlink()
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.yaml")}
    code, _, err = run(train_main, ["--resume", out, "--quiet"], capsys)
    assert code == 2 and error_line(err) == (
        f"error: {out / 'best.pt'}: not found, though epoch {best_epoch} scored best on valid and was saved there "
        "(deleted or moved?): put it back to finish the run, or start over with --overwrite")
    assert {name: (out / name).read_bytes() for name in kept} == kept and not (out / "results.json").exists()


def test_i19_16_repeated_pairs_are_a_warning_with_the_counts_and_the_split(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    train_row = next(x for x in lines[1:] if x.endswith("\t0"))
    test_row = next(x for x in lines[1:] if x.endswith("\t2"))
    # a train pair twice, and a test pair also in train
    inter.write_text("\n".join([*lines, train_row, test_row[:-1] + "0"]) + "\n")
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}", "train.epochs=1"), capsys)
    assert code == 0
    assert (f"warning: {inter}: repeated (userID, itemID) pairs: 1 extra row(s) within train, 1 test row(s) whose "
            "pair is also in train (train items are masked when scoring, so those rows are never hit)") in err


@pytest.mark.filterwarnings("error")  # a numpy warning printed before the error line broke the one-line promise
def test_i19_17_an_empty_inter_file_is_one_line(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    inter = root / "tiny" / "tiny.inter"
    inter.write_text(inter.read_text().splitlines()[0] + "\n")
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and error_line(err) == (f"error: {inter}: the train split (x_label 0) is empty: the file holds "
                                             "no rows after its header")


@pytest.mark.filterwarnings("error")
def test_i19_17_float64_features_beyond_float32_are_out_of_range_not_nan(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    feat_path = root / "tiny" / "image_feat.npy"
    feat = np.load(feat_path).astype(np.float64)
    feat[7, 3] = 1e300
    np.save(feat_path, feat)
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and error_line(err) == (f"error: {feat_path}: 1 row(s) hold values beyond float32's range of "
                                             "±3.4e38 (first: row 7, 1e+300)")


def test_i19_18_overrides_may_follow_any_flag(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(train_main, ["--config", workdir / "tiny.yaml", "--quiet", "train.epochs=1", "--out", out,
                                    "model.n_layers=2"], capsys)
    assert code == 0, err
    text = (out / "config.yaml").read_text()
    assert "  epochs: 1\n" in text and "  n_layers: 2\n" in text


# ---------------------------------------------------------------- issue 19: further hostile cases


def test_i19_x_a_run_directory_given_as_the_checkpoint(workdir, capsys):
    done = workdir / "runs" / "done"
    code, _, err = run(eval_main, ["--checkpoint", done, "--device", "cpu"], capsys)
    assert code == 2 and error_line(err) == (f"error: {done}: is a folder, not a checkpoint: name a file in it "
                                             f"(e.g. {done / 'best.pt'})")


def test_i19_x_recommend_to_a_pipe_or_device_is_refused(workdir, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run(recommend_main, recommend_args(workdir / "runs" / "done" / "best.pt", fifo), capsys)
    assert code == 2 and error_line(err) == f"error: {fifo}: is not a regular file; name a file to write"
    assert fifo.is_fifo()


@pytest.mark.parametrize("content, problem", [("", "holds no userIDs (one per line)"),
                                              ("3\n7\n3\n", "3: userID 3 is listed again (first on line 1)")])
def test_i19_x_a_users_file_that_is_empty_or_repeats_a_user(workdir, tmp_path, capsys, content, problem):
    users = tmp_path / "users.txt"
    users.write_text(content)
    recs = tmp_path / "recs.tsv"
    code, _, err = run(recommend_main, recommend_args(workdir / "runs" / "done" / "best.pt", recs, "--users", users),
                       capsys)
    assert code == 2 and error_line(err) == f"error: {users}:{problem}".replace(":holds", ": holds")
    assert not recs.exists()


@pytest.mark.parametrize("device", ["mps", "meta", "cuda:7"])
def test_i19_x_a_device_msi_cannot_run_on(workdir, capsys, device):
    code, _, err = run(eval_main, ["--checkpoint", workdir / "runs" / "done" / "best.pt", "--device", device], capsys)
    assert code == 2 and error_line(err).startswith(f"error: device '{device}'")


def test_i19_x_integers_beyond_int64_name_the_key_or_option(workdir, tmp_path, capsys):
    best = workdir / "runs" / "done" / "best.pt"
    code, _, err = run(eval_main, ["--checkpoint", best, "--device", "cpu", "--ks", f"10,{2**63}"], capsys)
    assert code == 2 and error_line(err).startswith(f"error: --ks '10,{2**63}': expected comma-separated positive")
    for override, key in (("model.embedding_dim=1e30", "model.embedding_dim"), ("eval.ks=[20,1e30]", "eval.ks")):
        code, _, err = run(train_main, train_args(workdir, tmp_path / "run", override), capsys)
        assert code == 2 and error_line(err).startswith(f"error: config key '{key}' must lie within ±(2**63 - 1)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, size", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 240000000000000 bytes. Error code 12 (Cannot allocate memory)"),
     " (tried to allocate 240000000000000 bytes)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"),
     " (tried to allocate 20.00 GiB)"),
])
def test_i19_x_out_of_memory_is_one_line(workdir, tmp_path, capsys, monkeypatch, error, size):
    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(msi.train, "build_model", too_big)
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run"), capsys)
    assert code == 2 and error_line(err) == (f"error: out of memory{size}: lower train.batch_size, eval.batch_users "
                                             "or model.embedding_dim")
    monkeypatch.setattr(msi.train, "build_model", lambda *a, **k: 1 / 0)  # any other error is a bug: a traceback
    with pytest.raises(ZeroDivisionError):
        train_main([str(a) for a in train_args(workdir, tmp_path / "run2")])


def test_i19_x_feature_files_that_promise_more_than_they_hold_or_have_no_columns(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    feat_path = root / "tiny" / "image_feat.npy"
    with open(feat_path, "wb") as f:  # 40 x 10**12 float32 in the header, 100 bytes after it
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (40, 10**12)})
        f.write(bytes(100))
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and error_line(err) == (f"error: {feat_path}: not a readable .npy array (the file is shorter "
                                             "than its header's shape says)")
    np.save(feat_path, np.zeros((40, 0), np.float32))
    code, _, err = run(train_main, train_args(workdir, tmp_path / "run", f"data.root={root}"), capsys)
    assert code == 2 and error_line(err) == (f"error: {feat_path}: expected a 2-d array (n_items, dim >= 1), got "
                                             "shape (40, 0)")


@pytest.mark.parametrize("name", ["../evil", ".."])
def test_i19_x_synth_names_that_are_not_plain_folder_names(tmp_path, capsys, name):
    code, _, err = run(data_main, ["synth", "--preset", "tiny", "--out", tmp_path / "d", "--name", name, "--quiet"],
                       capsys)
    assert code == 2 and error_line(err).startswith(f"error: data set name {name!r} must be a plain folder name")
    assert list(tmp_path.iterdir()) == []


def test_i19_x_a_damaged_resume_state_is_one_line(workdir, tmp_path, capsys):
    out = killed_copy(workdir, tmp_path)
    last = load_checkpoint(out / "last.pt")
    torch.save({**last, "progress": {**last["progress"], "epoch": "2"}}, out / "last.pt")
    code, _, err = run(train_main, ["--resume", out, "--quiet"], capsys)
    assert code == 2 and error_line(err) == (f"error: {out / 'last.pt'}: not an msi checkpoint: progress.epoch is "
                                             "'2', not a count")


def test_i19_x_a_bad_id_mapping_names_its_line(workdir, tmp_path, capsys):
    root = copy_data(workdir, tmp_path)
    mapping = root / "tiny" / "i_id_mapping.csv"
    mapping.write_text("asin\titemID\n" + "".join(f"B{i}\t{i}\n" for i in range(39)) + "B39\t-1\n")
    ckpt = load_checkpoint(workdir / "runs" / "done" / "best.pt")
    ckpt["config"]["data"]["root"] = str(root)
    save_checkpoint(tmp_path / "moved.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    code, _, err = run(recommend_main, recommend_args(tmp_path / "moved.pt", tmp_path / "recs.tsv"), capsys)
    assert code == 2 and error_line(err) == f"error: {mapping}:41: itemID '-1' is negative"
    assert not (tmp_path / "recs.tsv").exists()


def test_i19_x_recommend_under_a_file_is_refused_before_any_work(workdir, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" / "sub" / "recs.tsv"
    code, _, err = run(recommend_main, recommend_args(workdir / "runs" / "done" / "best.pt", out), capsys)
    assert code == 2 and error_line(err) == f"error: {out}: {tmp_path / 'f'} is a file, not a folder"
    assert (tmp_path / "f").read_text() == "mine"



# ---------------------------------------------------------------- issue 19: msi-sweep and msi-compare


def sweep_args(workdir: Path, out: Path, *extra: str) -> list:
    return ["--config", workdir / "tiny.yaml", "--seeds", "1", "--out", out, *extra]


@pytest.mark.parametrize("flags, key", [
    (["--deadline", "0"], "--deadline 0"), (["--deadline", "-1"], "--deadline -1"),
    (["--deadline", "nan"], "--deadline nan"), (["--max-concurrent", "0"], "--max-concurrent 0"),
    (["--max-concurrent", "-1"], "--max-concurrent -1"), (["--cpus-per-trial", "0"], "--cpus-per-trial 0"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial -1.0"),
])
def test_i19_14_sweep_limits_under_which_no_trial_could_run(workdir, tmp_path, capsys, flags, key):
    from msi.cli import sweep_main

    code, _, err = run(sweep_main, sweep_args(workdir, tmp_path / "s", *flags), capsys)
    assert code == 2 and error_line(err).startswith(f"error: {key}: must be")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, says", [
    (["--grid", "model.dropout=0.3,0.3"], "--grid 'model.dropout=0.3,0.3': model.dropout=0.3 is given twice"),
    (["--grid", "model.dropout=0.3,0.30"], "--grid: model.dropout=0.3 and model.dropout=0.30 give tiny.yaml the "
                                           "same config"),
    (["--grid", "model.dropout=0.3", "model.dropout=0.5"], "--grid 'model.dropout=0.5': model.dropout is already "
                                                          "an axis"),
    (["--grid", "train.seed=1,2"], "--grid train.seed=...: the seeds are --seeds"),
    (["--grid", "model.dropout=0.3,0.5", "--set", "model.dropout=0.1"], "--set model.dropout=0.1: model.dropout is "
                                                                         "given by --grid"),
    (["--set", "train.seed=5"], "--set train.seed=5: train.seed is given by --seeds"),
])
def test_i19_5_a_sweep_that_would_train_one_config_twice(workdir, tmp_path, capsys, extra, says):
    from msi.cli import sweep_main

    code, _, err = run(sweep_main, sweep_args(workdir, tmp_path / "s", *extra), capsys)
    assert code == 2 and error_line(err).startswith(f"error: {says}")
    assert not (tmp_path / "s").exists()


def test_i19_5_one_live_sweep_per_folder_and_a_trial_in_use_is_not_touched(workdir, tmp_path, capsys, monkeypatch):
    from msi.cli import sweep_main
    from msi.sweepdir import record_sweep

    monkeypatch.setattr("msi.sweep.import_ray", lambda: None)  # refused before Ray would start

    out = tmp_path / "s"
    with msi.rundir.locked(out, "msi-sweep"):  # another live msi-sweep on this --out (here: this process)
        code, _, err = run(sweep_main, sweep_args(workdir, out), capsys)
    assert code == 2 and error_line(err) == (f"error: {out}: in use by another live msi-sweep process (pid "
                                             f"{os.getpid()}); wait for it to end or choose another --out")
    assert not out.exists()  # the lock's holder made the folder, and removed it empty
    record_sweep(out, [workdir / "tiny.yaml"], [], [1], [])
    run_dir = out / "tiny_s1"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a partial start, which a sweep clears when free
    with msi.rundir.locked(run_dir):  # a live msi-train in the trial's directory
        code, _, err = run(sweep_main, sweep_args(workdir, out), capsys)
        assert code == 2 and error_line(err).startswith(f"error: {run_dir}: in use by a live process (pid ")
        assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert not (out / ".lock").exists()


def test_i19_15_a_failed_check_writes_no_sweep_yaml_and_the_corrected_command_runs(workdir, tmp_path, capsys,
                                                                                  monkeypatch):
    from msi.cli import sweep_main

    out = tmp_path / "s"
    code, _, err = run(sweep_main, sweep_args(workdir, out, "--grid", "data.name=tiny,tinx"), capsys)
    assert code == 2 and "tinx" in error_line(err) and not out.exists()

    def tune(todo, *args):  # Ray's part, which this test leaves out: the trials start and stop at once
        for t in todo:
            t.run_dir.mkdir()
    monkeypatch.setattr("msi.sweep._tune", tune)
    monkeypatch.setattr("msi.sweep.import_ray", lambda: None)
    code, out_text, _ = run(sweep_main, sweep_args(workdir, out, "--grid", "data.name=tiny"), capsys)
    assert code == 0 and "| tiny | none eligible | 0 |" in out_text


def test_i19_15_ctrl_c_of_a_sweep_says_the_command_that_continues_it(workdir, tmp_path, capsys, monkeypatch):
    import shlex

    from msi.cli import sweep_main

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr("msi.sweep._tune", ctrl_c)
    monkeypatch.setattr("msi.sweep.import_ray", lambda: None)
    argv = sweep_args(workdir, tmp_path / "s", "--grid", "loss.alpha=0.1,0.01")
    code, _, err = run(sweep_main, argv, capsys)
    line = error_line(err)
    assert code == 130 and line.startswith("error: interrupted; ")
    assert line.endswith(f"continue with {shlex.join(['msi-sweep', *map(str, argv)])}")
    assert (tmp_path / "s" / "sweep.yaml").is_file() and not (tmp_path / "s" / ".lock").exists()


@pytest.mark.parametrize("text, why", [
    ("configs: [a\n", "not valid YAML"),
    ("configs: a.yaml\ngrid: []\nseeds: [1]\nset: []\n", "configs must be a list"),
    ("configs: [a.yaml]\ngrid: []\nseeds: [one]\nset: []\n", "seeds must be a list of whole numbers; 'one' is not"),
])
def test_i19_8_a_damaged_sweep_yaml_names_the_file(tmp_path, capsys, text, why):
    from msi.cli import sweep_main

    (tmp_path / "sweep.yaml").write_text(text)
    code, _, err = run(sweep_main, ["--report", tmp_path], capsys)
    assert code == 2 and error_line(err).startswith(f"error: {tmp_path / 'sweep.yaml'}: {why}")
    assert (tmp_path / "sweep.yaml").read_text() == text


def test_i19_x_sweep_folders_that_are_not_what_they_should_be(workdir, tmp_path, capsys, fabricate_sweep):
    from msi.cli import sweep_main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, _, err = run(sweep_main, sweep_args(workdir, notes), capsys)  # --out: a folder of someone else's
    assert code == 2 and error_line(err).startswith(f"error: {notes}: holds todo.txt but no sweep.yaml")
    code, _, err = run(sweep_main, ["--report", notes], capsys)  # --report: a folder that is not a sweep
    assert code == 2 and error_line(err).startswith(f"error: {notes / 'sweep.yaml'}: not found")
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    sweep = fabricate_sweep(tmp_path / "sweep", {"recall": {p: [(0.5, 0.5, True)] * 2 for p in (
        ("loss.alpha=0.1", "eval.ks=[10,20]"), ("loss.alpha=0.1", "eval.ks=[10,20,50]"),
        ("loss.alpha=0.01", "eval.ks=[10,20]"), ("loss.alpha=0.01", "eval.ks=[10,20,50]"))}})
    code, _, err = run(sweep_main, ["--report", sweep, "--baseline", "lightgcn"], capsys)
    assert code == 2 and error_line(err) == "error: --baseline 'lightgcn': the sweep's configs are recall"
    (notes / "results.md").write_text("mine")  # a union's --out holding someone's results.md
    code, _, err = run(sweep_main, ["--report", sweep, sweep, "--out", notes], capsys)
    assert code == 2 and error_line(err).startswith(f"error: {notes / 'results.md'}: exists and was not written by "
                                                    "msi-sweep --report (a union)")
    assert (notes / "results.md").read_text() == "mine"
    moved = tmp_path / "moved"
    moved.mkdir()
    for d in sweep.glob("recall_*"):
        d.rename(moved / d.name)  # the trial directories moved out of the sweep folder
    code, _, err = run(sweep_main, ["--report", sweep], capsys)
    assert code == 2 and error_line(err).startswith(f"error: {sweep}: holds none of its sweep's 8 trial directories")


def test_i19_x_compare_never_writes_over_a_file_it_did_not_write(workdir, tmp_path, capsys):
    from msi.cli import compare_main

    done = workdir / "runs" / "done"
    before = snapshot(done)
    for flag, target in (("--out", done / "best.pt"), ("--json", done / "results.json")):
        code, _, err = run(compare_main, ["--a", done, "--b", done, "--quiet", "--device", "cpu", flag, target], capsys)
        assert code == 2 and error_line(err).startswith(f"error: {target}: exists and was not written by msi-compare")
    assert snapshot(done) == before
    argv = ["--a", done, "--b", done, "--quiet", "--device", "cpu", "--out", tmp_path / "c.md", "--json",
            tmp_path / "c.json"]
    assert run(compare_main, argv, capsys)[0] == 0 and run(compare_main, argv, capsys)[0] == 0  # its own: rewritten
    assert json.loads((tmp_path / "c.json").read_text())["delta"] == 0.0
    for items in ("warm", "all"):  # its own --items warm output is its own too (it was refused once)
        assert run(compare_main, [*argv, "--items", items], capsys)[0] == 0
        assert json.loads((tmp_path / "c.json").read_text())["items"] == items


# ---------------------------------------------------------------- issue 26: check everything before changing anything


def finished_copy(workdir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "done", out)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "mps"], ["train.tensorboard=true"]])
def test_26_1_a_refused_resume_changes_nothing(workdir, tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard extra
    out = finished_copy(workdir, tmp_path)
    before = snapshot(out)
    code, _, err = run(train_main, ["--resume", out, "train.epochs=4", "--quiet", *extra], capsys)
    expected = {"cuda": "error: device 'cuda' was asked for, but this torch build sees no CUDA GPU",
                "mps": "error: device 'mps': msi runs on auto, cpu, cuda or cuda:N",
                "train.tensorboard=true": "error: train.tensorboard: true needs TensorBoard: pip install -e "
                                          "'.[tensorboard]'"}[extra[-1]]
    assert code == 2 and error_line(err) == expected
    assert snapshot(out) == before  # results.json kept, config.yaml still says the old epochs


def test_26_2_plot_replaces_only_a_picture_it_wrote(workdir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from msi.cli import plot_main

    done, notes = workdir / "runs" / "done", tmp_path / "notes.svg"
    notes.write_text("<svg>my own drawing</svg>")
    code, _, err = run(plot_main, [done, "--out", notes], capsys)
    assert code == 2 and error_line(err) == (f"error: {notes}: exists and was not written by msi-plot: not written "
                                             "over; choose another file, or pass --overwrite to replace it")
    assert notes.read_text() == "<svg>my own drawing</svg>"
    for suffix in ("svg", "png", "pdf"):  # a picture msi-plot wrote is replaced, in each format
        picture = tmp_path / f"curves.{suffix}"
        assert run(plot_main, [done, "--out", picture], capsys)[0] == 0
        assert run(plot_main, [done, "--out", picture], capsys)[0] == 0
    assert run(plot_main, [done, "--out", notes, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.pdf", "curves.png", "curves.svg", "notes.svg"]


@pytest.mark.parametrize("name", ["../../escape", "/tmp/absolute", ".", "..", "a\\b"])
def test_26_3_a_run_name_is_one_path_component(workdir, tmp_path, capsys, name):
    out_dir = tmp_path / "deep" / "runs"
    code, _, err = run(train_main, ["--config", workdir / "tiny.yaml", "--quiet", f"train.out_dir={out_dir}",
                                    f"train.run_name={name}"], capsys)
    assert code == 2 and error_line(err) == (f"error: config key 'train.run_name': {name!r} must be a plain folder "
                                             "name (not empty, '.' or '..', no '/', '\\' or NUL byte)")
    assert list(tmp_path.iterdir()) == []


def test_26_4_compare_refuses_a_run_still_training_or_never_finished(workdir, tmp_path, capsys):
    from msi.cli import compare_main

    done, other = workdir / "runs" / "done", finished_copy(workdir, tmp_path)
    (other / "results.json").unlink()  # interrupted before its end
    args = ["--a", done, "--b", other, "--device", "cpu", "--quiet"]
    code, _, err = run(compare_main, args, capsys)
    assert code == 2 and error_line(err) == (f"error: {other}: not finished (no results.json): its best.pt is of an "
                                             "interrupted run; finish it with msi-train --resume, or pass "
                                             "--unfinished to compare it as it is")
    assert run(compare_main, [*args, "--unfinished"], capsys)[0] == 0
    with msi.rundir.locked(other):  # a live msi-train on it (here: this process)
        code, _, err = run(compare_main, [*args, "--unfinished"], capsys)
    assert code == 2 and error_line(err) == (f"error: {other}: still training (msi-train pid {os.getpid()} holds "
                                             "it); compare it once it has finished")


def test_26_5_sigterm_is_handled_as_ctrl_c(workdir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "msi.cli", "train", "--config", str(workdir / "tiny.yaml"),
                             "--out", str(out), "train.epochs=100000", "train.patience=100000", "--quiet"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not (out / "last.pt").exists():  # the run is in its epochs
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    line = error_line(err)
    assert line.startswith("error: interrupted; ") and line.endswith(f"continue with msi-train --resume {out}")
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("valid, best", [([0.1, 0.3, float("nan"), 0.2], 2), ([float("nan")] * 3, None),
                                         ([0.1, None, 0.3, 0.3], 3), ([0.2, 0.1, 0.2], 1)])
def test_26_6_plot_marks_the_epoch_the_trainer_chose(tmp_path, capsys, valid, best):
    """The trainer's rule (msi.rundir.improves): strictly better than the best so far; NaN and null never are."""
    from msi.plot import best_epoch, read_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {seed: 1}\n")
    rows = [{"loss": 1.0, "epoch": e, "valid": {"recall@20": v}, "terms": ["loss"]} for e, v in enumerate(valid, 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_epoch(rows, "recall@20") == best
    read_run(run_dir)
    bad = [str(e) for e, v in enumerate(valid, 1) if not isinstance(v, float) or v != v]
    warning = (f"warning: {run_dir / 'metrics.jsonl'}: valid recall@20 is not a finite number at epoch(s) "
               f"{', '.join(bad)}; left out of the curve (the trainer never selects such an epoch)")
    assert capsys.readouterr().err.splitlines() == ([warning] if bad else [])
    if importlib.util.find_spec("matplotlib") is not None:
        from msi.cli import plot_main

        assert run(plot_main, [run_dir, "--out", tmp_path / "c.png"], capsys)[0] == 0


class _Plugin(msi.models.Recommender):
    """A plugin's model whose faults a test chooses: ``fault`` in "no loss", "non-scalar", "embeddings"."""

    def __init__(self, n_users: int, n_items: int, fault: str) -> None:
        super().__init__()
        self.n_users, self.fault = n_users, fault
        self.user = torch.nn.Parameter(torch.randn(n_users, 4))
        self.item = torch.nn.Parameter(torch.randn(n_items, 4))

    def embeddings(self) -> dict[str, torch.Tensor]:
        items = self.item[:-1] if self.fault == "embeddings" else self.item
        return {"user": self.user.detach(), "id": items.detach()}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        score = (self.user[users] * self.item[items]).sum(-1)
        if self.fault == "no loss":
            return {"bpr": -score.mean()}
        return {"loss": -score if self.fault == "non-scalar" else -score.mean()}


@pytest.fixture
def plugin(monkeypatch):
    """Register ``plugin-<fault>`` models for this test only; "builder" is one whose builder raises."""
    from msi import registry

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    for fault in ("no loss", "non-scalar", "embeddings", "none"):
        registry.register(f"plugin-{fault.replace(' ', '-')}", item_features=False)(
            lambda cfg, data, fault=fault: _Plugin(data.n_users, data.n_items, fault))

    def broken(cfg, data):
        raise ValueError("the plugin's own bug")

    registry.register("plugin-builder")(broken)
    return registry


@pytest.mark.parametrize("fault, problem", [
    ("builder", f"the builder of model 'plugin-builder' ({__name__}) raised ValueError: the plugin's own bug"),
    ("no-loss", f"model 'plugin-no-loss' ({__name__}._Plugin): loss() must return a dict holding 'loss', "
                "got ['bpr'] (docs/adding_a_model.md gives the interface)"),
    ("non-scalar", f"model 'plugin-non-scalar' ({__name__}._Plugin): loss() term 'loss' must be a scalar "
                   "tensor, got (20,) (docs/adding_a_model.md gives the interface)"),
    ("embeddings", f"model 'plugin-embeddings' ({__name__}._Plugin): embeddings()['id'] must be (40, d) "
                   "with one d for all, got (39, 4) (docs/adding_a_model.md gives the interface)"),
])
def test_26_7_a_plugin_that_breaks_its_contract_is_one_line_before_the_run_starts(workdir, tmp_path, capsys,
                                                                                  plugin, fault, problem):
    out, config = tmp_path / "run", tmp_path / "plugin.yaml"
    config.write_text((workdir / "tiny.yaml").read_text().replace("model:\n  embedding_dim: 8\n", ""))
    code, _, err = run(train_main, ["--config", config, "--quiet", "--out", out, f"model.name=plugin-{fault}",
                                    "train.batch_size=20"], capsys)
    assert code == 2 and error_line(err) == f"error: {problem}"
    assert not out.exists()  # no half-started run folder


def test_26_7_a_plugin_builder_that_raises_is_one_line_in_eval_too(workdir, tmp_path, capsys, plugin):
    ckpt = load_checkpoint(workdir / "runs" / "done" / "best.pt")
    ckpt["config"]["model"]["name"] = "plugin-builder"
    save_checkpoint(tmp_path / "p.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    code, _, err = run(eval_main, ["--checkpoint", tmp_path / "p.pt", "--device", "cpu"], capsys)
    assert code == 2 and error_line(err) == (f"error: the builder of model 'plugin-builder' ({__name__}) "
                                             "raised ValueError: the plugin's own bug")


def test_26_7_a_plugin_rule_across_keys_that_raises_is_one_line(workdir, tmp_path, capsys, plugin):
    from dataclasses import dataclass

    @dataclass
    class Keys:
        def validate(self, cfg):
            return cfg.model.missing  # the plugin's own bug

    plugin.register("plugin-rule", item_features=False, model=Keys)(lambda cfg, data: None)
    config = tmp_path / "plugin.yaml"
    config.write_text((workdir / "tiny.yaml").read_text().replace("model:\n  embedding_dim: 8\n", ""))
    code, _, err = run(train_main, ["--config", config, "--out", tmp_path / "run", "model.name=plugin-rule"], capsys)
    assert code == 2 and error_line(err).startswith("error: model 'plugin-rule': ")
    assert "Keys.validate raised AttributeError: " in error_line(err)
    assert not (tmp_path / "run").exists()


def test_26_8_an_override_given_twice_on_resume_is_warned(workdir, tmp_path, capsys):
    out = finished_copy(workdir, tmp_path)
    code, _, err = run(train_main, ["--resume", out, "train.epochs=5", "train.epochs=4", "--quiet"], capsys)
    assert code == 0 and "warning: override train.epochs is given twice ('5', then '4'); the last is used" in err
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 4


@pytest.mark.parametrize("edit", ["change", "delete"])
def test_26_9_a_hand_edit_to_config_yaml_is_warned_on_resume(workdir, tmp_path, capsys, edit):
    out = finished_copy(workdir, tmp_path)
    config = out / "config.yaml"
    if edit == "delete":
        config.unlink()
        warning = f"warning: {config}: missing; the run goes on with last.pt's config and writes it there again"
    else:
        config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.5"))
        warning = (f"warning: {config}: train.lr differs from last.pt's config (edited by hand?); the run goes on "
                   "with last.pt's, and config.yaml is written from it again: change how long or how often with "
                   "--resume RUN key=value")
    code, _, err = run(train_main, ["--resume", out, f"train.epochs={EPOCHS + 1}", "--quiet"], capsys)
    assert code == 0 and warning in err.splitlines()
    assert "lr: 0.001" in config.read_text()


def test_26_10_a_flat_dotted_key_in_yaml_is_told_that_keys_nest(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"
    flat.write_text("train.epochs: 1\n")
    code, _, err = run(train_main, ["--config", flat, "--out", tmp_path / "run"], capsys)
    assert code == 2 and error_line(err) == ("error: unknown config section 'train.epochs': keys nest under their "
                                             "section; write 'train:' and under it '  epochs: ...'")


def test_26_11_an_oversized_config_file_or_value_is_refused_at_once(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("data:\n  name: tiny\n" + "# padding\n" * 200_000)
    code, _, err = run(train_main, ["--config", big, "--out", tmp_path / "run"], capsys)
    assert code == 2 and error_line(err) == (f"error: {big}: {big.stat().st_size:,} bytes is not a config file (msi "
                                             "reads at most 1,048,576)")
    small = tmp_path / "small.yaml"
    small.write_text("data:\n  name: tiny\n")
    code, _, err = run(train_main, ["--config", small, "data.name=" + "x" * 5000], capsys)
    assert code == 2 and error_line(err) == ("error: config key 'data.name' holds a text of 5,000 characters; at most "
                                             "4,096")
    code, _, err = run(train_main, ["--config", small, f"eval.ks=[{','.join(['5'] * 2000)}]"], capsys)
    assert code == 2 and error_line(err) == "error: config key 'eval.ks' holds 2,000 entries; at most 1,000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml", "small.yaml"]


def test_26_12_a_yaml_boolean_is_not_text(workdir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((workdir / "tiny.yaml").read_text().replace("name: tiny", "name: yes"))
    code, _, err = run(train_main, ["--config", cfg, "--out", tmp_path / "run"], capsys)
    assert code == 2 and error_line(err) == ("error: config key 'data.name': YAML reads True as a boolean, not text; "
                                             "quote it: 'true'")


def test_26_13_a_full_stdout_is_named(workdir, capsys, monkeypatch):
    from msi.cli import compare_main

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    done = workdir / "runs" / "done"
    monkeypatch.setattr(sys, "stdout", Full())
    code = compare_main([str(a) for a in ["--a", done, "--b", done, "--device", "cpu", "--quiet"]])
    monkeypatch.undo()
    _, err = capsys.readouterr()
    assert code == 2 and error_line(err) == "error: stdout: could not write the output (No space left on device)"


def test_26_14_the_in_use_refusal_of_a_resume_does_not_suggest_out(workdir, tmp_path, capsys):
    out = finished_copy(workdir, tmp_path)
    with msi.rundir.locked(out):
        code, _, err = run(train_main, ["--resume", out, "train.epochs=4", "--quiet"], capsys)
    assert code == 2 and error_line(err) == (f"error: {out}: in use by another live msi-train process (pid "
                                             f"{os.getpid()}); wait for it to end; a run is resumed by one process "
                                             "at a time")


def test_26_15_compare_of_a_plugin_run_without_the_plugin_names_the_run(workdir, tmp_path, capsys):
    from msi.cli import compare_main

    out = finished_copy(workdir, tmp_path)
    ckpt = load_checkpoint(out / "best.pt")
    ckpt["config"]["model"]["name"] = "not-installed"
    save_checkpoint(out / "best.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    code, _, err = run(compare_main, ["--a", workdir / "runs" / "done", "--b", out, "--device", "cpu"], capsys)
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: {out / 'best.pt'}: its config does not load here (config key "
                                         "'model.name': no model named 'not-installed'")


# ---------------------------------------------------------------- issue 26: the promise kept for whole classes

HUGE = "9" * 100_000


def class_cases(workdir: Path, tmp_path: Path) -> dict[str, tuple]:
    """One hostile value per surface: (tool, argv)."""
    from msi.cli import compare_main, sweep_main

    best, done = workdir / "runs" / "done" / "best.pt", workdir / "runs" / "done"
    users = tmp_path / "users.txt"
    users.write_text(HUGE + "\n")
    return {
        "eval --ks": (eval_main, ["--checkpoint", best, "--device", "cpu", "--ks", HUGE + "x"]),
        "train --device": (train_main, train_args(workdir, tmp_path / "r", "--device", HUGE)),
        "recommend --users": (recommend_main, recommend_args(best, tmp_path / "r.tsv", "--users", "x" * 100_000)),
        "recommend --users file": (recommend_main, recommend_args(best, tmp_path / "r.tsv", "--users", users)),
        "recommend --k": (recommend_main, recommend_args(best, tmp_path / "r.tsv", "--k", HUGE)),
        "compare --metric": (compare_main, ["--a", done, "--b", done, "--metric", "recall@" + HUGE]),
        "sweep --grid": (sweep_main, ["--config", workdir / "tiny.yaml", "--out", tmp_path / "s", "--grid", HUGE]),
        "sweep --seeds": (sweep_main, ["--config", workdir / "tiny.yaml", "--out", tmp_path / "s", "--seeds",
                                       str(2**64)]),
        "synth --seed": (data_main, ["synth", "--preset", "tiny", "--out", tmp_path / "d", "--seed", str(2**64)]),
        "NUL in a path": (recommend_main, recommend_args(best, f"{tmp_path}/r\0.tsv")),
    }


@pytest.mark.parametrize("case", ["eval --ks", "train --device", "recommend --users", "recommend --users file",
                                  "recommend --k", "compare --metric", "sweep --grid", "sweep --seeds", "synth --seed",
                                  "NUL in a path"])
def test_26_classes_any_hostile_value_is_one_short_line_and_nothing_is_written(workdir, tmp_path, capsys, case):
    main, argv = class_cases(workdir, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(main, argv, capsys)
    line = error_line(err)
    assert code == 2 and out == "" and len(line) < 400 and "\0" not in line, line[:300]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_26_classes_ids_in_text_files_follow_the_inter_readers_rules(workdir, tmp_path, capsys):
    best = workdir / "runs" / "done" / "best.pt"
    users = tmp_path / "users.txt"
    for text, problem in (("1_0", "is not an integer"), ("\u0661", "is not an integer"), ("-1", "is negative"),
                          ("1e30", "is far out of range"), ("2.5", "is not an integer")):
        users.write_text(f"0\n{text}\n")
        code, _, err = run(recommend_main, recommend_args(best, tmp_path / "r.tsv", "--users", users), capsys)
        assert code == 2 and error_line(err).startswith(f"error: {users}:2: userID {text!r} {problem}")
    assert not (tmp_path / "r.tsv").exists()

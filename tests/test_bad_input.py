"""The hostile-user catalogue, case by case, through the command-line functions on generated ``tiny`` data.

Each case: the exit status, a one-line ``error: ...`` that names the file or key (no traceback), and nothing that
was saved before is lost or misreported. The numbers are those of the catalogue in the README's "Bad input".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
    assert list(tmp_path.glob("recs.tsv*")) == []


def test_14_ctrl_c_exits_130_and_says_how_to_resume(workdir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(msi.train, "run_epoch", interrupted)
    out = tmp_path / "run"
    code, _, err = run(train_main, train_args(workdir, out), capsys)
    assert code == 130 and f"--resume {out}" in error_line(err)


def test_14_resuming_a_finished_run_changes_nothing(workdir, capsys):
    done = workdir / "runs" / "done"
    before = snapshot(done)
    code, out, _ = run(train_main, ["--resume", done, "--quiet"], capsys)
    assert code == 0 and json.loads(out)["test"] == json.loads(before["results.json"])["test"]
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
    assert 0 <= json.loads(out)["test"]["recall@20"] <= 1


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

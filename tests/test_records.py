"""msi/records.py: the environment record kept in env.json and the TensorBoard log (a no-op when off, an error naming
the extra when missing)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msi.errors import MSIError
from msi.records import TensorBoardLog, environment, git_commit
from msi.rundir import record_env

REPO = Path(__file__).resolve().parent.parent
ROW = {"rec": 0.7, "loss": 1.5, "epoch": 3, "epoch_seconds": 0.2, "valid": {"recall@20": 0.25, "ndcg@20": 0.1},
       "terms": ["rec", "loss"]}


def test_env_json_names_versions_device_host_command_and_commit(tmp_path):
    record_env(tmp_path, environment(torch.device("cpu"), argv=["msi-train", "--config", "x.yaml"]), resumed=False)
    record = json.loads((tmp_path / "env.json").read_text())
    assert record["resumes"] == []
    env = record["first"]
    assert set(env) == {"python", "torch", "cuda", "cudnn", "device", "device_name", "host", "command", "git_commit"}
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["device"] == "cpu" and env["command"] == ["msi-train", "--config", "x.yaml"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))


def test_env_json_keeps_the_first_record_and_appends_each_resume(tmp_path):
    record_env(tmp_path, environment(argv=["msi-train", "--config", "x.yaml"]), resumed=False)
    record_env(tmp_path, environment(argv=["msi-train", "--resume", "r"]), resumed=True)
    record_env(tmp_path, environment(argv=["msi-train", "--resume", "r", "train.epochs=9"]), resumed=True)
    record = json.loads((tmp_path / "env.json").read_text())
    assert record["first"]["command"] == ["msi-train", "--config", "x.yaml"]
    assert [r["command"][-1] for r in record["resumes"]] == ["r", "train.epochs=9"]
    record_env(tmp_path, environment(argv=["msi-train", "--config", "y.yaml"]), resumed=False)  # --overwrite: anew
    assert json.loads((tmp_path / "env.json").read_text())["resumes"] == []


def test_git_commit_of_a_checkout_and_none_outside_one(tmp_path):
    assert git_commit(tmp_path) is None
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    assert git_commit(REPO).removesuffix("-dirty") == head.stdout.strip()


def test_tensorboard_off_writes_nothing(tmp_path):
    log = TensorBoardLog(tmp_path, enabled=False)
    log.log(ROW)
    log.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs .[tensorboard]")
def test_tensorboard_on_writes_every_term_and_valid_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLog(tmp_path, enabled=True)
    log.log(ROW)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"loss/rec", "loss/loss", "epoch/epoch_seconds", "valid/recall@20", "valid/ndcg@20"}
    (point,) = events.Scalars("valid/recall@20")
    assert point.step == 3 and point.value == pytest.approx(0.25)


def test_tensorboard_on_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MSIError, match=r"train.tensorboard: true needs TensorBoard: pip install -e '\.\[tensorboard"):
        TensorBoardLog(tmp_path, enabled=True)

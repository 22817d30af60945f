"""msi/checkpoint.py and msi.runtime.open_run: weights-only loading, clear errors, atomic saves, RNG state, foreign
data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from msi.checkpoint import (
    FORMAT_VERSION, check_matches_data, check_weights, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from msi.config import load_config
from msi.data.synth import generate
from msi.errors import CheckpointError
from msi.runtime import open_run
from msi.train import train


def payload(**extra) -> dict:
    model = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    data = {"name": "x", "n_users": 2, "n_items": 3, "features": {"image": 4}}
    return {"config": {"train": {"epochs": 3}}, "model": model, "epoch": 2, "data": data, **extra}


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, payload(progress={"best_metric": 0.25, "best_epoch": 1}))
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "msi-checkpoint" and ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["msi_version"]
    assert torch.equal(ckpt["model"]["w"], payload()["model"]["w"])
    assert ckpt["epoch"] == 2 and ckpt["progress"] == {"best_metric": 0.25, "best_epoch": 1}
    assert ckpt["data"]["features"] == {"image": 4}


class RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: a file appears if a loader ever runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class PlainObject:
    pass


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "code-ran"
    torch.save({**payload(), "format": "msi-checkpoint", "format_version": 1, "msi_version": "0",
                "x": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    torch.save({"format": "msi-checkpoint", "x": PlainObject()}, path)
    with pytest.raises(CheckpointError, match="PlainObject") as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message


@pytest.mark.parametrize("keep, problem", [(0.5, "truncated checkpoint: the zip archive stops after"),
                                           (0.99, "truncated checkpoint"), (0.0, "empty file, not a checkpoint")])
def test_a_truncated_file_is_a_clear_error_naming_it(tmp_path, keep, problem):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=problem) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found") as err:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(err.value)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: is a folder, not a checkpoint: name a file in it "
                                              f"\\(e.g. {tmp_path / 'best.pt'}\\)"):
        load_checkpoint(tmp_path)  # a run directory given for its checkpoint


def test_other_files_are_not_msi_checkpoints(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)  # some other tool's checkpoint
    with pytest.raises(CheckpointError, match="not an msi checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not an msi checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in payload().items() if k != "data"})
    with pytest.raises(CheckpointError, match="missing data"):
        load_checkpoint(path)
    save_checkpoint(path, payload(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, problem", [
    ({"format_version": "1"}, "format_version is '1', not a positive integer"),
    ({"format_version": None}, "format_version is None"),
    ({"format_version": True}, "format_version is True"),
    ({"config": "train: {epochs: 3}"}, "config is a str, not a mapping"),
    ({"model": [torch.zeros(2)]}, "model is a list, not a mapping"),
    ({"model": {}}, "model holds no weights"),
    ({"model": {"w": [1.0, 2.0]}}, "model weight 'w' is a list, not a tensor"),
    ({"epoch": 1.5}, "epoch is 1.5, not a count of epochs"),
    ({"data": {}}, "data has no n_users"),
    ({"data": None}, "data is None, not a mapping"),
    ({"data": {"n_users": 2, "n_items": "3", "features": {}}}, "data.n_items is '3', not a positive integer"),
    ({"data": {"n_users": 2, "n_items": 3, "features": ["image"]}}, "data.features is \\['image'\\], not a mapping"),
    ({"progress": [1]}, "progress is a list, not a mapping"),
    ({"progress": {"epoch": "2"}}, "progress.epoch is '2', not a count"),
    ({"optimizer": {"state": []}}, "optimizer is not an optimizer's state"),
    ({"rng": {"python": 1}}, r"rng holds \['python'\], not the random states"),
])
def test_a_malformed_payload_is_not_an_msi_checkpoint(tmp_path, change, problem):
    path = tmp_path / "c.pt"
    save_checkpoint(path, payload(**change))
    with pytest.raises(CheckpointError, match=f"^{path}: not an msi checkpoint: {problem}"):
        load_checkpoint(path)


def test_check_weights_refuses_missing_extra_and_reshaped_weights():
    expected = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    check_weights({"w": torch.ones(2, 3), "b": torch.ones(3)}, expected, "c.pt")
    cases = [({"w": torch.zeros(2, 3)}, "model has no weight 'b'"),
             ({**expected, "x": torch.zeros(1)}, r"model holds weights its config's model does not have \(x\)"),
             ({**expected, "w": torch.zeros(3)}, r"model weight 'w' is torch.float32 of shape \(3,\), its config's "
                                                 r"model needs torch.float32 of shape \(2, 3\)"),
             ({**expected, "b": torch.zeros(3, dtype=torch.int64)}, "model weight 'b' is torch.int64")]
    for state, problem in cases:
        with pytest.raises(CheckpointError, match=f"^c.pt: not an msi checkpoint: {problem}"):
            check_weights(state, expected, "c.pt")


def test_atomic_save_leaves_no_temporary_files_and_a_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload())
    save_checkpoint(path, payload(epoch=3))  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(Exception):
        save_checkpoint(path, payload(epoch=4, bad=lambda: None))  # a lambda cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 3


def draws() -> tuple:
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    np.random.standard_normal()  # leave a cached Gaussian in numpy's legacy state: it must be saved too
    path = tmp_path / "rng.pt"
    save_checkpoint(path, payload(rng=rng_state()))
    expected = draws()
    draws()  # move every generator on
    set_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected


def test_check_matches_data_refuses_other_sizes_widths_and_fingerprints():
    ckpt = {"data": {"n_users": 2, "n_items": 3, "features": {"image": 4}, "fingerprint": "a" * 64}}
    sig = {"name": "x", "n_users": 2, "n_items": 3, "features": {"image": 4}, "fingerprint": "a" * 64}
    check_matches_data(ckpt, "c.pt", sig)
    with pytest.raises(CheckpointError, match="c.pt: trained on 2 users, 3 items"):
        check_matches_data(ckpt, "c.pt", {**sig, "n_users": 5})
    with pytest.raises(CheckpointError, match="features"):
        check_matches_data(ckpt, "c.pt", {**sig, "features": {"image": 8}})
    other = {**sig, "fingerprint": "b" * 64}
    with pytest.raises(CheckpointError, match="c.pt: trained on other data of the same shape.*--allow-other-data"):
        check_matches_data(ckpt, "c.pt", other)
    check_matches_data(ckpt, "c.pt", other, allow_other_data=True)
    with pytest.raises(CheckpointError, match="users"):  # the override never lets other shapes through
        check_matches_data(ckpt, "c.pt", {**other, "n_users": 5}, allow_other_data=True)


def test_open_run_rebuilds_the_model_and_refuses_a_foreign_data_set(tmp_path):
    generate("tiny", tmp_path / "data" / "tiny", seed=0, progress=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", "data.name=tiny", "model.embedding_dim=8",
                             "train.epochs=1", "train.device=cpu"])
    train(cfg, out=tmp_path / "run", quiet=True)
    ckpt_path = tmp_path / "run" / "best.pt"
    model, cfg2, dataset, ckpt = open_run(ckpt_path)
    assert ckpt["epoch"] == 1
    assert not model.training and cfg2.model.embedding_dim == 8
    saved = load_checkpoint(ckpt_path)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # the data folder now holds another data set: user 59's rows are gone, so there are 59 users, not 60
    inter = tmp_path / "data" / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split("\t")[0] != "59"]) + "\n")
    with pytest.raises(CheckpointError, match=r"trained on 60 users, 40 items.*has 59 users, 40 items") as err:
        open_run(ckpt_path)
    assert str(ckpt_path) in str(err.value)

"""msi/train.py: the run directory, selection on valid, early stopping, reproducibility, resume, NaN faults."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import msi.train
from msi.checkpoint import load_checkpoint
from msi.config import Config, load_config
from msi.data.synth import generate
from msi.errors import ConfigError, MSIError
from msi.models.msi import MSI
from msi.train import TrainingDiverged, resume, train

EPOCHS = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    generate("tiny", root / "tiny", seed=0, progress=False)
    return root


def config(data_root: Path, *overrides: str) -> Config:
    return load_config(None, [
        f"data.root={data_root}", "data.name=tiny", "model.embedding_dim=16", f"train.epochs={EPOCHS}",
        "train.device=cpu", "eval.ks=[5,20]", *overrides,
    ])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rs]


@pytest.fixture(scope="module")
def run_a(data_root, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of EPOCHS epochs."""
    out = tmp_path_factory.mktemp("runs") / "a"
    return out, train(config(data_root), out=out, quiet=True)


def test_run_directory_holds_config_metrics_checkpoints_and_results(run_a):
    run_dir, results = run_a
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "results.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert results["epochs_run"] == EPOCHS
    assert set(results["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit", "mrr")
                                    for k in (5, 20)}
    assert set(results["popularity"]["test"]) == set(results["test"])  # the floor, scored alike
    assert load_config(run_dir / "config.yaml").train.epochs == EPOCHS
    rs = rows(run_dir)
    assert [r["epoch"] for r in rs] == list(range(1, EPOCHS + 1))
    for r in rs:
        assert {"loss", "rec", "align", "mask", "reg", "ssd", "epoch_seconds", "eval_seconds", "valid"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "rec", "align", "mask", "reg"))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == EPOCHS


def test_best_checkpoint_is_chosen_by_valid_and_test_is_scored_with_it(run_a):
    run_dir, results = run_a
    recalls = [r["valid"]["recall@20"] for r in rows(run_dir)]
    best_epoch = recalls.index(max(recalls)) + 1  # the first epoch reaching the maximum (strictly better only)
    assert results["best_epoch"] == best_epoch
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch
    # the final valid metrics are those logged at the best epoch: the same weights, scored again
    assert results["valid"] == rows(run_dir)[best_epoch - 1]["valid"]
    assert results["selected_by"] == "valid recall@20"


def test_same_seed_gives_the_same_metrics_bit_for_bit(data_root, run_a, tmp_path):
    run_dir, results = run_a
    again = train(config(data_root), out=tmp_path / "b", quiet=True)
    assert again["valid"] == results["valid"]
    assert again["test"] == results["test"]
    assert without_times(rows(tmp_path / "b")) == without_times(rows(run_dir))


def test_another_seed_gives_other_losses(data_root, run_a, tmp_path):
    train(config(data_root, "train.seed=7", "train.epochs=1"), out=tmp_path / "s", quiet=True)
    assert rows(tmp_path / "s")[0]["loss"] != rows(run_a[0])[0]["loss"]


def test_killed_run_resumes_to_the_same_metrics(data_root, run_a, tmp_path, monkeypatch):
    run_dir_a, results_a = run_a
    k = 2  # the run is killed while epoch k + 1 runs
    real_epoch = msi.train.run_epoch

    def killed_at_epoch_k_plus_1(*args, **kwargs):
        if args[4] == k:  # 0-based epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(msi.train, "run_epoch", killed_at_epoch_k_plus_1)
    run_b = tmp_path / "b"
    with pytest.raises(MSIError, match=r"--resume") as err:
        train(config(data_root), out=run_b, quiet=True)
    assert str(run_b) in str(err.value)
    monkeypatch.undo()
    assert load_checkpoint(run_b / "last.pt")["epoch"] == k  # Ctrl-C leaves a usable last.pt
    assert not (run_b / "results.json").exists()
    # a row written after the checkpoint (a kill between the two writes) is dropped on resume
    with open(run_b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": k + 1, "loss": 123.0}) + "\n")

    results_b = resume(run_b, quiet=True)
    assert results_b["valid"] == results_a["valid"]
    assert results_b["test"] == results_a["test"]
    assert results_b["best_epoch"] == results_a["best_epoch"]
    assert results_b["epochs_run"] == EPOCHS
    assert without_times(rows(run_b)) == without_times(rows(run_dir_a))


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(MSIError, match="not found"):
        resume(tmp_path / "nope", quiet=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch, bad):
    real_loss = MSI.loss
    calls = []

    def loss_goes_bad_in_epoch_2(self, users, items):
        calls.append(1)
        terms = real_loss(self, users, items)
        if len(calls) >= 3:  # call 1 is the contract check, then one batch per epoch: call 3 is epoch 2
            terms["loss"] = terms["loss"] * bad
        return terms

    monkeypatch.setattr(MSI, "loss", loss_goes_bad_in_epoch_2)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"(nan|inf) at epoch 2, batch 1"):
        train(config(data_root, "train.batch_size=100000"), out=run_dir, quiet=True)
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert [r["epoch"] for r in rows(run_dir)] == [1]
    assert not (run_dir / "results.json").exists()


def test_early_stopping_after_patience_evaluations_without_improvement(data_root, tmp_path):
    results = train(config(data_root, "train.epochs=60", "train.patience=2"), out=tmp_path / "es", quiet=True)
    rs = rows(tmp_path / "es")
    assert results["epochs_run"] == len(rs) < 60
    assert results["epochs_run"] == results["best_epoch"] + 2
    best = rs[results["best_epoch"] - 1]["valid"]["recall@20"]
    assert all(r["valid"]["recall@20"] <= best for r in rs)


def test_eval_every_and_no_evaluation_at_all(data_root, tmp_path):
    results = train(config(data_root, "train.eval_every=2"), out=tmp_path / "e2", quiet=True)
    rs = rows(tmp_path / "e2")
    assert ["valid" in r for r in rs] == [False, True, False, True]
    assert results["best_epoch"] in (2, 4)
    with pytest.raises(ConfigError, match=r"'train.eval_every' must be <= train.epochs \(1\)"):  # none would run
        config(data_root, "train.epochs=1", "train.eval_every=2")


# ---------------------------------------------------------------- what a run directory keeps (train.log, env.json)


def log_lines(run_dir: Path) -> list[str]:
    """train.log without the time each line was written."""
    return [line.split(" ", 2)[2] for line in (run_dir / "train.log").read_text().splitlines()]


def test_train_log_keeps_the_console_lines_also_when_quiet_and_the_lock_is_gone(run_a):
    run_dir, results = run_a
    lines = log_lines(run_dir)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == [f"epoch {e}" for e in range(1, EPOCHS + 1)]
    assert lines[-1].startswith(f"best epoch {results['best_epoch']}: valid recall@5=")
    assert not (run_dir / ".lock").exists()
    for r in rows(run_dir):  # the loss terms are named in the row; diagnostics and times are not terms
        assert {"loss", "rec", "align", "mask", "reg", "ssd"} <= set(r["terms"]) <= set(r)
        assert not {t for t in r["terms"] if t.startswith("grad_") or t.endswith("_seconds") or t == "epoch"}


def test_run_dir_in_results_is_absolute(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = train(config(data_root, "train.epochs=1"), out="relative", quiet=True)
    assert results["run_dir"] == str(tmp_path / "relative")
    assert json.loads((tmp_path / "relative" / "results.json").read_text())["run_dir"] == str(tmp_path / "relative")


def test_extending_a_finished_run_trains_on_to_the_run_it_would_have_been(data_root, run_a, tmp_path, capsys):
    longer = train(config(data_root, f"train.epochs={EPOCHS + 2}"), out=tmp_path / "long", quiet=True)
    run_dir = tmp_path / "a"
    shutil.copytree(run_a[0], run_dir)
    results = resume(run_dir, [f"train.epochs={EPOCHS + 2}", "train.tensorboard=false"])
    assert {k: results[k] for k in ("valid", "test", "best_epoch", "epochs_run")} == \
        {k: longer[k] for k in ("valid", "test", "best_epoch", "epochs_run")}  # best.pt continued
    assert json.loads((run_dir / "results.json").read_text()) == results  # written again at the new end
    assert without_times(rows(run_dir)) == without_times(rows(tmp_path / "long"))
    assert load_config(run_dir / "config.yaml").train.epochs == EPOCHS + 2
    lines = log_lines(run_dir)
    assert f"resume with train.epochs={EPOCHS + 2} (was {EPOCHS}) (config.yaml updated)" in lines
    assert f"epoch {EPOCHS + 2}: loss=" in capsys.readouterr().out  # not quiet: the console shows what the log keeps
    assert len([line for line in lines if line.startswith("epoch ")]) == EPOCHS + 2  # appended on resume
    env = json.loads((run_dir / "env.json").read_text())
    assert env["first"] is not None and len(env["resumes"]) == 1


def test_resume_refuses_keys_that_change_the_model_or_the_data(run_a, tmp_path):
    run_dir = tmp_path / "a"
    shutil.copytree(run_a[0], run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for bad in ("model.dropout=0.1", "train.lr=0.1", "data.root=/elsewhere"):
        with pytest.raises(ConfigError, match=f"--resume cannot change '{bad.partition('=')[0]}'"):
            resume(run_dir, [bad], quiet=True)
    with pytest.raises(ConfigError, match=f"already trained {EPOCHS} epochs"):
        resume(run_dir, ["train.epochs=2"], quiet=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_damaged_results_json_counts_as_unfinished_and_is_written_again(run_a, tmp_path):
    run_dir = tmp_path / "a"
    shutil.copytree(run_a[0], run_dir)
    (run_dir / "results.json").write_text('{"best_epoch": 2, "val')
    results = resume(run_dir, quiet=True)
    assert {k: results[k] for k in ("valid", "test", "best_epoch")} == {k: run_a[1][k] for k in ("valid", "test",
                                                                                                  "best_epoch")}
    assert f"{run_dir / 'results.json'}: damaged, not JSON" in (run_dir / "train.log").read_text()


def test_an_early_stopped_run_trains_on_only_with_more_patience(data_root, tmp_path):
    run_dir = tmp_path / "es"
    first = train(config(data_root, "train.epochs=60", "train.patience=1"), out=run_dir, quiet=True)
    assert first["epochs_run"] == first["best_epoch"] + 1 < 60
    same = resume(run_dir, ["train.epochs=70"], quiet=True)
    assert same["epochs_run"] == first["epochs_run"]
    assert "only a larger train.patience trains it further" in (run_dir / "train.log").read_text()
    more = resume(run_dir, ["train.patience=3"], quiet=True)
    assert more["epochs_run"] >= first["epochs_run"] + 2 and more["epochs_run"] == more["best_epoch"] + 3
    assert [r["epoch"] for r in rows(run_dir)] == list(range(1, more["epochs_run"] + 1))


def test_a_run_failing_before_its_config_is_written_leaves_the_directory_empty(data_root, tmp_path, monkeypatch):
    def disk_full(run_dir, cfg):
        raise MSIError(f"{run_dir / 'config.yaml'}: could not write (No space left on device)")

    monkeypatch.setattr(msi.train, "write_config", disk_full)
    with pytest.raises(MSIError, match="No space left"):
        train(config(data_root, "train.epochs=1"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # no train.log, no .lock, no folder: the same command can start here
    monkeypatch.undo()
    assert train(config(data_root, "train.epochs=1"), out=tmp_path / "run", quiet=True)["epochs_run"] == 1
    assert log_lines(tmp_path / "run")[0].startswith("tiny: ")  # the held lines were written with the run


def test_train_trains_the_very_model_and_data_passed(data_root, tmp_path):
    from msi.models import build_model
    from msi.runtime import dataset_for

    cfg = config(data_root, "train.epochs=2")
    data = dataset_for(cfg)
    model = build_model(cfg, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(cfg, out=tmp_path / "run", quiet=True, model=model, data=data)
    last = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())  # what trained is what was saved
    other = build_model(config(data_root, "model.embedding_dim=8"), data)
    with pytest.raises(MSIError, match="not the one the config describes"):
        train(cfg, out=tmp_path / "run2", quiet=True, model=other, data=data)


def test_resume_from_a_checkpoint_without_resume_state_is_one_clear_error(run_a, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(run_a[0], run_dir)
    (run_dir / "results.json").unlink()
    shutil.copy(run_dir / "best.pt", run_dir / "last.pt")  # best.pt holds no optimizer or RNG state
    with pytest.raises(MSIError, match="not a resumable checkpoint: it lacks optimizer, rng"):
        resume(run_dir, quiet=True)


def test_resume_with_an_optimizer_state_of_other_parameters_is_one_clear_error(run_a, tmp_path):
    from msi.checkpoint import save_checkpoint

    run_dir = tmp_path / "copy"
    shutil.copytree(run_a[0], run_dir)
    (run_dir / "results.json").unlink()
    payload = load_checkpoint(run_dir / "last.pt")
    payload["optimizer"]["param_groups"][0]["params"] = [0]  # one parameter where the model has many
    save_checkpoint(run_dir / "last.pt", payload)
    with pytest.raises(MSIError, match="its optimizer state does not fit the model"):
        resume(run_dir, quiet=True)

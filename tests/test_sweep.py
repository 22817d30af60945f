"""msi/sweep.py: a real sweep through Ray Tune on generated data (CPU), stopped at a deadline and finished by
re-running; a failing trial; the one-line error without the extra. The Ray tests skip without ``.[sweep]``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from msi.cli import sweep_main
from msi.errors import MSIError
from msi.sweepdir import plan_trials, trial_state
from msi.sweep import import_ray, read_valid_rows, run_sweep, start_ray, trials_word

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the extra: .[sweep]")
GRID = ["loss.alpha=0.1,0.01", "model.dropout=0.3,0.5"]
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray for the module's sweeps (starting one takes seconds)."""
    started = start_ray()
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("data: {root: data, name: tiny, synth_preset: tiny}\nmodel: {embedding_dim: 16}\n"
                    "train: {epochs: 4, patience: 2, lr: 0.01, device: cpu}\n")
    return path


@needs_ray
def test_sweep_stopped_at_a_deadline_and_rerun_ends_with_the_uninterrupted_table(ray_session, config, tmp_path,
                                                                                   capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_sweep([config], GRID, SEEDS, full)
    run_sweep([config], GRID, SEEDS, cut, deadline=3)
    states = [trial_state(t.run_dir) for t in plan_trials([config], GRID, SEEDS, cut)]
    assert states.count("done") < len(states)  # 8 trials cannot all finish in 3 s on 2 cores
    finished = plan_trials([config], GRID, SEEDS, full)[0]
    shutil.copytree(finished.run_dir, cut / finished.name, dirs_exist_ok=True)  # one trial done ...
    damaged = cut / finished.name / "results.json"
    damaged.write_text(damaged.read_text()[:40])  # ... but its results.json cut short: scored again
    capsys.readouterr()
    argv = ["--config", config, "--grid", *GRID, "--seeds", *SEEDS, "--out", cut]
    assert sweep_main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert (cut / "results.md").read_text() == (full / "results.md").read_text()
    assert out.endswith((full / "results.md").read_text())
    assert all(trial_state(t.run_dir) == "done" for t in plan_trials([config], GRID, SEEDS, cut))
    for t in plan_trials([config], GRID, SEEDS, full):  # each trial's log holds its epoch lines
        log = (full / "logs" / f"{t.name}.log").read_text()
        assert " start on node " in log and " epoch 1: loss=" in log and " best epoch " in log
    assert "| tiny | " in out and "popularity, tiny" in out
    rescored = json.loads(damaged.read_text())["valid"]
    assert rescored == json.loads((finished.run_dir / "results.json").read_text())["valid"]


@needs_ray
def test_a_trial_larger_than_any_node_is_refused_at_once(ray_session, config, tmp_path, capsys):
    argv = ["--config", config, "--seeds", "1", "--out", tmp_path / "s", "--gpus-per-trial", "64"]
    assert sweep_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --gpus-per-trial 64: no node of the Ray cluster has 64 GPUs")


def test_cluster_check_takes_the_largest_live_node():
    from msi.sweep import check_cluster

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    check_cluster(4, 1, nodes)
    check_cluster(16, 0, nodes)
    with pytest.raises(MSIError, match="^--cpus-per-trial 16 --gpus-per-trial 1: no node of the Ray cluster has both "
                                       "\\(4 CPUs, 1 GPUs; 16 CPUs, 0 GPUs\\)"):
        check_cluster(16, 1, nodes)  # each ask alone fits a node, both together none
    with pytest.raises(MSIError, match="^--cpus-per-trial 32: no node of the Ray cluster has 32 CPUs \\(the most on "
                                       "one node is 16\\)"):
        check_cluster(32, 0, nodes)
    with pytest.raises(MSIError, match="^--gpus-per-trial 2: .* \\(the most on one node is 1\\)"):
        check_cluster(1, 2, nodes)


@needs_ray
def test_failing_trial_is_retried_then_reported_and_the_table_still_written(ray_session, config, tmp_path, capsys):
    from msi.sweepdir import record_sweep

    out = tmp_path / "broken"
    record_sweep(out, [config], [], [1], ["train.epochs=1"])
    (out / "tiny_s1").mkdir()
    (out / "tiny_s1" / "last.pt").write_bytes(b"not a checkpoint")  # what a failing disk leaves: every resume fails
    argv = ["--config", config, "--seeds", "1", "--out", out, "--set", "train.epochs=1"]
    assert sweep_main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert "tiny_s1: FAILED after 3 tries" in captured.err + captured.out
    assert "last.pt" in captured.err + captured.out
    assert (out / "logs" / "tiny_s1.log").read_text().count(" on node ") == 3  # three tries
    assert "| tiny | none eligible | 0 |" in (out / "results.md").read_text()


def test_rerun_with_another_grid_into_the_same_folder_is_refused(config, tmp_path):
    from msi.sweepdir import record_sweep


    record_sweep(tmp_path / "s", [config], GRID, SEEDS, [])
    with pytest.raises(MSIError, match="another sweep"):
        run_sweep([config], ["loss.alpha=0.5"], SEEDS, tmp_path / "s")


def test_valid_rows_skip_epochs_without_evaluation_and_an_unfinished_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "valid": {"recall@20": 0.5}}\n'
                                            '{"epoch": 3, "valid": {"recall@20": 0.7}}\n{"epoch": 4, "val')
    assert read_valid_rows(tmp_path, "recall@20") == [(2, 0.5), (3, 0.7)]
    assert read_valid_rows(tmp_path, "recall@20", after=2) == [(3, 0.7)]
    assert read_valid_rows(tmp_path / "none", "recall@20") == []


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MSIError, match=r"pip install -e '\.\[sweep\]'"):
        import_ray()


def test_without_ray_msi_sweep_refuses_before_it_writes_or_counts(monkeypatch, config, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "sweep"
    argv = ["--config", str(config), "--seeds", "1", "--out", str(out)]
    assert sweep_main(argv) == 2
    printed = capsys.readouterr()
    assert "trial" not in printed.out  # the data set may be generated; no trial is counted
    assert printed.err == "error: msi-sweep needs Ray Tune: pip install -e '.[sweep]'\n"
    assert not out.exists()  # no sweep.yaml: the same command with Ray installed starts here


def test_trial_counts_are_singular_for_one():
    assert [trials_word(n) for n in (0, 1, 2)] == ["0 trials", "1 trial", "2 trials"]


@needs_ray
def test_asha_marks_the_trials_it_stops_and_never_a_finished_one(tmp_path):
    from types import SimpleNamespace

    from msi.sweep import stop_marking_asha

    scheduler = stop_marking_asha(max_epochs=9)  # grace period 1 epoch, reduction factor 3
    trials = [SimpleNamespace(trial_id=str(i), config={"trial": {"run_dir": str(tmp_path / f"r{i}")}})
              for i in range(4)]
    for t in trials:
        Path(t.config["trial"]["run_dir"]).mkdir()
        scheduler.on_trial_add(None, t)
    (tmp_path / "r3" / "results.json").write_text(json.dumps({  # finished before the scheduler's word reached it
        "best_epoch": 1, "epochs_run": 1, "valid": {"recall@20": 0.2}, "test": {"recall@20": 0.2},
        "train_seconds": 1.0, "selected_by": "valid recall@20", "run_dir": str(tmp_path / "r3")}))
    decisions = [scheduler.on_trial_result(None, t, {"epoch": 1, "valid": v})
                 for t, v in zip(trials, [0.5, 0.9, 0.1, 0.2])]
    assert decisions == ["CONTINUE", "CONTINUE", "STOP", "STOP"]
    assert [trial_state(tmp_path / f"r{i}") for i in range(4)] == ["new", "new", "stopped", "done"]
    assert json.loads((tmp_path / "r2" / "stopped.json").read_text()) == {"by": "asha", "epoch": 1, "valid": 0.1}


def _init_that_prints(text: str, error: Exception | None):
    """A stand-in for ray.init that writes ``text`` to the process's stderr (file descriptor 2, as Ray's core
    does) and then raises ``error`` or returns."""
    import os

    def init():
        os.write(2, text.encode())
        if error is not None:
            raise error
    return init


def test_a_token_cluster_without_the_token_is_one_line(monkeypatch, capfd):
    from msi.sweep import join_cluster

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    spam = "gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: InvalidAuthToken\n" * 20
    with pytest.raises(MSIError, match="token authentication; set RAY_AUTH_MODE=token") as e:
        join_cluster(_init_that_prints(spam, ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")),
                     "10.0.0.1:6379")
    assert "\n" not in str(e.value)
    assert "Unauthenticated" not in capfd.readouterr().err  # the 20 lines were caught, not shown
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(MSIError, match="RAY_AUTH_TOKEN"):
        join_cluster(_init_that_prints(spam, ConnectionError("x")), "10.0.0.1:6379")


def test_joining_a_cluster_passes_rays_output_on_and_names_other_failures(capfd):
    from msi.sweep import join_cluster

    join_cluster(_init_that_prints("Connected to Ray cluster.\n", None), "h:6379")
    assert "Connected to Ray cluster." in capfd.readouterr().err
    with pytest.raises(MSIError, match="could not join the Ray cluster at h:6379: Failed to connect"):
        join_cluster(_init_that_prints("", ConnectionError("Failed to connect to Ray cluster at h:6379")), "h:6379")


def test_an_address_where_nothing_answers_is_one_line_at_once():
    import socket

    from msi.sweep import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed: nothing listens there
    with pytest.raises(MSIError, match=f"^could not join the Ray cluster at 127.0.0.1:{port}: nothing answers there"):
        check_reachable(f"127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")  # something listens: Ray's own join decides
    check_reachable("ray://head:10001")  # Ray Client addresses are left to Ray

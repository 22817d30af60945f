"""msi-sweep: configs x grid x seeds on Ray Tune, resumable from the run directories, selected on valid only.

Each trial runs the normal trainer in a Ray worker and writes an ordinary run directory. The run directories are
the truth: a trial with ``results.json`` is skipped, one with ``last.pt`` resumes, one with ``stopped.json`` (ASHA
stopped it) is never run, resumed or selected again; anything else (a damaged results.json included) is a partial
start and is cleared or resumed. So re-running the same command after a crash, Ctrl-C or ``--deadline`` finishes the
sweep. Selection and the tables are ``msi.select``'s. Each trial appends its node, the lines its trainer writes to
the run's train.log (one per epoch) and any traceback to ``<out>/logs/<run name>.log``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

import msi
from msi.config import config_from_dict
from msi.console import progress_bar
from msi.errors import MSIError
from msi.rundir import STOPPED, DamagedRunFile, locked, read_log, read_metrics, read_results, write_json
from msi.select import report
from msi.sweepdir import (Trial, check_free, check_sweep, copy_log, prepare_trial_dir, record_sweep,
                          trial_state)

RETRIES = 2  # a failing trial is tried 1 + RETRIES times, then reported
QUIET_ENV = {  # only our lines reach the terminal: no Ray banners, dashboards, usage stats or new-style output
    "RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_TRAIN_V2_ENABLED": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000000",
    "PYTHONWARNINGS": "ignore",
}


def import_ray() -> Any:
    """Ray with its noise turned off, or a one-line error naming the extra."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise MSIError("msi-sweep needs Ray Tune: pip install -e '.[sweep]'") from None
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return ray


def start_ray(address: str | None = None) -> bool:
    """Start Ray embedded (``address`` None and no RAY_ADDRESS) or join a cluster; False if already running.

    Workers get this very ``msi`` package through ``py_modules``, so every node imports the driver's code.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    package = str(Path(msi.__file__).resolve().parent)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    init = functools.partial(ray.init, address=address, log_to_driver=False, include_dashboard=False,
                             logging_level=logging.ERROR,
                             runtime_env={"py_modules": [package], "env_vars": dict(QUIET_ENV),
                                          "excludes": ["__pycache__"]})
    if address == "local":
        init()
    else:
        check_reachable(address)
        join_cluster(init, address)
    return True


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse a ``host:port`` where nothing accepts a connection within ``timeout`` seconds: Ray itself retries
    such an address for about a quarter of an hour without a word. Other forms (``ray://...``, ``auto``) pass."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise MSIError(f"could not join the Ray cluster at {address}: nothing answers there ({e.strerror or e}); is "
                       "`ray start --head` running there, and is the address host:port of its GCS, 6379 by "
                       "default?") from None


def join_cluster(init: Callable[[], Any], address: str) -> None:
    """Run ``init`` (``ray.init`` joining ``address``) with the process's stderr caught: Ray's core prints a line
    per retry there (about 20 of "Unauthenticated" when the cluster wants a token the driver lacks). On success the
    caught text is passed on; on failure it decides the one-line error."""
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            init()
            failure = None
        except Exception as e:  # ConnectionError, RuntimeError, ...: Ray's own types vary by version
            failure = e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace")
    if failure is None:
        sys.stderr.write(text)
        return
    if "Unauthenticated" in text or "InvalidAuthToken" in text:
        hint = ("the driver has RAY_AUTH_MODE=token but not the cluster's token: give it RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH (ray start wrote it to ~/.ray/auth_token on the head node)"
                if os.environ.get("RAY_AUTH_MODE") == "token" else
                "set RAY_AUTH_MODE=token for msi-sweep (and copy the head node's ~/.ray/auth_token, or set "
                "RAY_AUTH_TOKEN, where the driver runs on another host)")
        raise MSIError(f"Ray cluster at {address} refused this driver: it uses token authentication; {hint}")
    last = str(failure).strip().splitlines()[-1] if str(failure).strip() else type(failure).__name__
    raise MSIError(f"could not join the Ray cluster at {address}: {last} (is `ray start --head` running there, "
                   "and is the address host:port of its GCS, 6379 by default?)")


def run_sweep(
    configs: list[Path], grid: list[str], seeds: list[int], out: Path, *, overrides: list[str] | None = None,
    cpus_per_trial: int = 1, gpus_per_trial: float = 0.0, max_concurrent: int | None = None,
    address: str | None = None, deadline: float | None = None, asha: bool = False,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Run every unfinished trial of the sweep on Ray Tune, then select on valid and write the tables; returns the
    summary. Everything is checked before a file is written (``check_limits``, then ``drive``'s checks, then Ray
    Tune installed: without the extra, a refusal that leaves --out as it was)."""
    check_limits(cpus_per_trial, gpus_per_trial, max_concurrent, deadline)

    def run(todo: list[Trial], cfgs: dict[str, Any], out: Path) -> None:
        _tune(todo, cfgs, out, cpus_per_trial, gpus_per_trial, max_concurrent, address, deadline, asha, log)

    return drive(configs, grid, seeds, out, list(overrides or []), run, log, needs=import_ray)


def drive(configs: list[Path], grid: list[str], seeds: list[int], out: Path, overrides: list[str],
          run: Callable[[list[Trial], dict[str, Any], Path], None], log: Callable[[str], None],
          needs: Callable[[], object] | None = None) -> dict[str, Any]:
    """The skeleton every sweep driver shares (msi-sweep on Ray, scripts/sweep_fallback.py without): check the sweep
    (``msi.sweepdir.check_sweep``) and what the driver ``needs`` (Ray Tune) before a file is written, hold
    ``<out>/.lock`` (one live sweep per folder), record sweep.yaml, refuse a trial directory a live process holds,
    ``run(todo, configs, out)`` the unfinished trials, say which are left, and write the tables
    (``msi.select.report``); returns the summary."""
    out = Path(out).resolve()
    trials, cfgs = check_sweep(configs, grid, seeds, out, overrides)
    if needs is not None:
        needs()  # a refusal that leaves --out as it was: the corrected command can start there
    with locked(out, "msi-sweep"):
        record_sweep(out, configs, grid, seeds, overrides)
        todo = [t for t in trials if trial_state(t.run_dir) in ("new", "resumable")]
        for t in todo:
            check_free(t.run_dir)
        log(f"{trials_word(len(trials))}: {len(trials) - len(todo)} already finished or stopped, {len(todo)} to run")
        if todo:
            run(todo, cfgs, out)
        left = [t for t in trials if trial_state(t.run_dir) in ("new", "resumable")]
        for t in left:
            try:
                log(f"{t.name}: unfinished, {len(read_metrics(t.run_dir))} epochs logged")
            except DamagedRunFile as e:
                log(f"{t.name}: unfinished; {e}")
        if left:
            log(f"{trials_word(len(left))} unfinished; run the same command again to continue "
                f"{'it' if len(left) == 1 else 'them'}")
        return report(out, unstarted=True)


def report_sweeps(folders: list[Path], out: Path | None = None, baseline: str | None = None,
                  by_test: bool = False) -> Path:
    """``msi-sweep --report``: re-render a sweep folder's tables (into ``out`` when given), or select once over the
    points of several folders (a grid run in parts) into ``out``. ``baseline``: results.md also holds each config's
    selected point against this config's, on test (``msi.compare.baseline_section``), made before any table is
    written; ``by_test``: also the column of what selecting on test would report (``msi.select.chosen_on_test``).
    Returns the folder written."""
    from msi.compare import baseline_section
    from msi.select import union_report

    if len(folders) > 1 and out is None:
        raise MSIError("--report with several folders writes the union's tables to --out DIR")
    extra = (lambda summary: baseline_section(summary, baseline)) if baseline else None
    dest = Path(out or folders[0])
    union_report(folders, dest, extra, by_test) if out else report(dest, extra=extra, by_test=by_test)
    return dest


def trials_word(n: int) -> str:
    """``1 trial``, ``2 trials``."""
    return f"{n} trial{'' if n == 1 else 's'}"


def check_limits(cpus_per_trial: int, gpus_per_trial: float, max_concurrent: int | None,
                 deadline: float | None) -> None:
    """Refuse resource and time limits under which no trial could run (None: no limit)."""
    if cpus_per_trial < 1:
        raise MSIError(f"--cpus-per-trial {cpus_per_trial}: must be >= 1")
    if not math.isfinite(gpus_per_trial) or gpus_per_trial < 0:
        raise MSIError(f"--gpus-per-trial {gpus_per_trial}: must be >= 0 (0: the CPU)")
    if max_concurrent is not None and max_concurrent < 1:
        raise MSIError(f"--max-concurrent {max_concurrent}: must be >= 1 (leave it out: as many as resources allow)")
    if deadline is not None and not (math.isfinite(deadline) and deadline > 0):
        raise MSIError(f"--deadline {deadline:g}: must be a number of seconds > 0 (leave it out: no deadline)")


def check_cluster(cpus_per_trial: int, gpus_per_trial: float, nodes: list[dict[str, Any]]) -> None:
    """Refuse a trial that no live node of the cluster could hold (``nodes``: ``ray.nodes()``); Tune would wait for
    it forever."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(r.get("CPU", 0) >= cpus_per_trial and r.get("GPU", 0) >= gpus_per_trial for r in alive):
        return
    for flag, want, key in (("--cpus-per-trial", cpus_per_trial, "CPU"), ("--gpus-per-trial", gpus_per_trial, "GPU")):
        most = max((r.get(key, 0) for r in alive), default=0)
        if want > most:
            raise MSIError(f"{flag} {want:g}: no node of the Ray cluster has {want:g} {key}s (the most on one node "
                           f"is {most:g}), so no trial could start; ask for at most {most:g}")
    have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in alive)
    raise MSIError(f"--cpus-per-trial {cpus_per_trial} --gpus-per-trial {gpus_per_trial:g}: no node of the Ray "
                   f"cluster has both ({have}), so no trial could start")


def _tune(
    todo: list[Trial], cfgs: dict, out: Path, cpus: int, gpus: float, max_concurrent: int | None,
    address: str | None, deadline: float | None, asha: bool, log: Callable[[str], None],
) -> None:
    ray = import_ray()
    from ray import tune

    specs = [{"name": t.name, "run_dir": str(t.run_dir), "config": cfgs[t.name].to_dict(), "threads": cpus,
              "device": "cuda" if gpus > 0 else "cpu", "metric": cfgs[t.name].train.metric,
              "log": str(out / "logs" / f"{t.name}.log")} for t in todo]
    max_epochs = max(cfgs[t.name].train.epochs for t in todo)
    started = start_ray(address)
    try:
        check_cluster(cpus, gpus, ray.nodes())
        with progress_bar(total=len(todo), desc="trials", unit="trial", leave=False) as bar:
            tuner = tune.Tuner(
                tune.with_resources(run_trial, {"cpu": cpus, "gpu": gpus}),
                param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    scheduler=stop_marking_asha(max_epochs) if asha else None, max_concurrent_trials=max_concurrent,
                    time_budget_s=deadline, reuse_actors=not asha,  # an ASHA-stopped trial's actor must die with it
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(out / ".tune"), verbose=0, log_to_file=True,
                    failure_config=tune.FailureConfig(max_failures=RETRIES), callbacks=[_progress(bar, log)]),
            )
            tuner.fit()
    finally:
        if started:
            ray.shutdown()


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _progress(bar: tqdm, log: Callable[[str], None]) -> Any:
    """A Tune callback: one line per finished, stopped or failed trial, and the progress bar."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self, bar: tqdm, log: Callable[[str], None]) -> None:
            self.bar, self.log = bar, log

        def __getstate__(self) -> dict:
            return {}  # Tune pickles its callbacks into the experiment state; the terminal stays here

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            spec, result = trial.config["trial"], trial.last_result or {}
            run_dir = Path(spec["run_dir"])
            state = trial_state(run_dir)
            if state == "done":
                res = read_results(run_dir)
                what = (f"done, valid {spec['metric']} {res['valid'][spec['metric']]:.4f} at epoch "
                        f"{res['best_epoch']} ({res['train_seconds']:.0f} s)")
            elif state == "stopped":
                what = f"stopped by ASHA after epoch {result.get('epoch')} (not selectable)"
            else:
                what = f"stopped after epoch {result.get('epoch', 0)} (resumable)"
            self._line(spec["name"], f"{what}, node {str(result.get('node', '?'))[:8]}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            spec = trial.config["trial"]
            log_path = Path(spec["log"])
            tail = log_path.read_text().strip().splitlines()[-3:] if log_path.is_file() else []
            self._line(spec["name"], f"FAILED after {1 + RETRIES} tries; {log_path}: " + " | ".join(tail))

        def _line(self, name: str, what: str) -> None:
            self.bar.update(1)
            self.log(f"[{time.strftime('%H:%M:%S')}] {name}: {what}")

    return Progress(bar, log)


def stop_marking_asha(max_epochs: int) -> Any:
    """ASHA on the valid metric per epoch; every trial it stops gets ``stopped.json`` and is never scored."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class StopMarkingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            run_dir = Path(trial.config["trial"]["run_dir"])
            if decision == TrialScheduler.STOP and not result.get("finished") and trial_state(run_dir) != "done":
                write_json(run_dir / STOPPED, {"by": "asha", "epoch": result["epoch"], "valid": result["valid"]})
            return decision

    # max_t beyond the last epoch: ASHA never stops a trial for reaching it, the trainer ends its runs
    return StopMarkingASHA(time_attr="epoch", metric="valid", mode="max", max_t=max_epochs + 1,
                           grace_period=max(1, max_epochs // 10), reduction_factor=3)


def run_trial(params: dict[str, Any]) -> None:
    """The Ray Tune trainable: train (or resume) one run directory in this worker, reporting valid per epoch."""
    import ray
    import torch
    from ray import tune

    spec = params["trial"]
    run_dir, log_path = Path(spec["run_dir"]), Path(spec["log"])
    torch.set_num_threads(spec["threads"])
    node = ray.get_runtime_context().get_node_id()
    resume = prepare_trial_dir(run_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} on node {node} "
                f"(host {os.uname().nodename}, pid {os.getpid()}, msi from {Path(msi.__file__).parent})\n")
    outcome: dict[str, Any] = {}
    offset = read_log(run_dir)[1]  # train.log's lines from here on are this attempt's
    thread = threading.Thread(target=_train_into, args=(spec, resume, outcome), daemon=True)
    thread.start()
    reported = 0
    while True:
        alive = thread.is_alive()  # read after this check, so the rows written before the end are all seen
        for row in read_valid_rows(run_dir, spec["metric"], after=reported):
            tune.report({"epoch": row[0], "valid": row[1], "node": node})
            reported = row[0]
        offset = copy_log(run_dir, log_path, offset)
        if not alive:
            break
        thread.join(timeout=1.0)
    if "error" in outcome:
        with open(log_path, "a") as f:
            f.write(outcome["error"])
        raise RuntimeError(f"{spec['name']}: {outcome['error'].strip().splitlines()[-1]}")
    res = outcome["results"]
    tune.report({"epoch": res["epochs_run"], "valid": res["valid"][spec["metric"]], "node": node, "finished": True})


def _train_into(spec: dict[str, Any], resumed: bool, outcome: dict[str, Any]) -> None:
    from msi.train import resume, train

    try:
        if resumed:
            outcome["results"] = resume(spec["run_dir"], quiet=True, device=spec["device"])
        else:
            cfg = config_from_dict(spec["config"])
            outcome["results"] = train(cfg, out=spec["run_dir"], quiet=True, device=spec["device"])
    except Exception:
        outcome["error"] = traceback.format_exc()


def read_valid_rows(run_dir: Path, metric: str, after: int = 0) -> list[tuple[int, float]]:
    """(epoch, valid metric) of the complete metrics rows of ``run_dir`` with an evaluation, after epoch ``after``."""
    return [(r["epoch"], r["valid"][metric]) for r in read_metrics(run_dir) if "valid" in r and r["epoch"] > after]


"""The training run (SPEC §3): epochs (``msi.epoch.run_epoch``), validation, early stopping, checkpoints.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch), ``best.pt`` (the best valid
metric so far), ``last.pt`` (the end of the last finished epoch, for ``--resume``), ``results.json`` (the test
split scored once, at the end, with the best checkpoint), ``env.json`` and ``train.log`` (every line the console
shows, also when quiet). Nothing is ever chosen by a test score. Its files are read and written by ``msi.rundir``.

A run directory is never clobbered: one that holds files is refused unless the run resumes it or is told to
overwrite it, and ``.lock`` (an exclusive ``flock`` held while the run lives, removed at its end) refuses a second
live process.

Two entry points: ``train`` (a new run) and ``resume`` (a run continued from its last.pt). Each reads and checks
everything (``_new_run``, ``_resumed_run``: the directory, the device, the extras, the data, the model) before it
changes the first file; both then share ``_run``: ``_loop`` (epochs) and ``_finish`` (test).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from msi.checkpoint import data_signature, first_non_finite, rng_state, save_checkpoint, set_rng_state
from msi.config import Config, changed_keys, resume_config
from msi.console import progress_bar
from msi.data.dataset import Dataset
from msi.errors import CheckpointError, ConfigError, DataError, Interrupted, MSIError, warn
from msi.epoch import TrainingDiverged, make_optimizer, run_epoch
from msi.evaluate import Evaluator, popularity_metrics
from msi.files import check_file_name, write_text
from msi.models import Recommender, build_model, epoch_diagnostics
from msi.models.base import check_contract
from msi.records import TensorBoardLog, check_tensorboard, environment
from msi.runtime import dataset_for, open_run, resolve_device, seed_everything
from msi.rundir import (BEST, CONFIG, LAST, METRICS, RESULTS, DamagedRunFile, append_log, append_metrics,
                        check_new_run_dir, improves, locked, read_config, read_results, record_env, remove_files,
                        remove_leftovers, truncate_metrics, unstarted_run, write_config, write_results)

Log = Callable[..., None]


@dataclass
class _Run:
    """What the loop and the finish step share."""

    dir: Path
    cfg: Config
    model: Recommender
    optimizer: torch.optim.Optimizer | None  # None: the model has no trainable parameters (popularity)
    evaluator: Evaluator
    pairs: torch.Tensor  # (n, 2) train (user, item) rows on the device
    signature: dict[str, Any]  # msi.checkpoint.data_signature, saved in every checkpoint
    progress: dict[str, Any]  # epoch, best_metric, best_epoch, bad_evals, stopped, train_seconds (in last.pt)
    saved_epoch: int  # the epoch last.pt holds


def train(
    cfg: Config, out: str | Path | None = None, overwrite: bool = False, quiet: bool = False,
    device: str | None = None, model: Recommender | None = None, data: Dataset | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model in a new run, select on valid, score test once; returns the contents of results.json.

    ``out``: the run directory (default ``<train.out_dir>/<train.run_name>``); it must be empty or missing unless
    ``overwrite`` (its run files are removed first). ``model`` and ``data``: train this very model object (built by
    ``build_model(cfg, data)``) on this data set instead of building them from ``cfg``. Everything is read and
    checked (the directory, the device, the extras, the data, the model's contract) before the first file changes.
    Every console line also goes to the run's train.log, also when ``quiet``.
    """
    run_dir = Path(os.path.abspath(_run_dir(cfg, out)))
    log = _TrainLog(run_dir, quiet)
    with locked(run_dir):
        present = check_new_run_dir(run_dir, overwrite)
        run = _new_run(cfg, run_dir, device, quiet, model, data)
        if present:  # everything checked: the first change
            remove_files(run_dir, present)
            log(f"removed {', '.join(present)} from {run_dir}{' (--overwrite)' if overwrite else ''}")
        write_config(run_dir, cfg)
        write_text(run_dir / METRICS, "")
        try:
            return _run(run, False, quiet, log)
        except BaseException:
            if (names := unstarted_run(run_dir)) is not None:  # no epoch row yet: the run leaves nothing behind
                remove_files(run_dir, names)  # (and locked() removes the folder when it made it)
            raise


def resume(
    run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), quiet: bool = False, device: str | None = None,
    allow_other_data: bool = False,
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last.pt with its saved config; returns results.json's contents.

    A finished run given no ``overrides`` returns its results.json as it is. ``overrides``: ``key=value`` changes
    a resume may make (``msi.config.RESUME_KEYS``: how long and how often); a finished run given more epochs (or
    more patience, when it stopped early) trains on, and its results.json is written again at the new end.
    ``allow_other_data``: data of the same shape but another fingerprint. Everything is read and checked before
    the first file changes: a refused resume leaves the run as it was.
    """
    run_dir = Path(os.path.abspath(run_dir))
    if not (run_dir / LAST).is_file():
        raise CheckpointError(f"{run_dir / LAST}: checkpoint not found; nothing to resume")
    log = _TrainLog(run_dir, quiet)
    with locked(run_dir, advice="wait for it to end; a run is resumed by one process at a time"):
        if not overrides and (done := _finished(run_dir, log)) is not None:
            if not quiet:  # the console only: resuming a finished run changes nothing in it
                tqdm.write(f"{run_dir} is finished (results.json); nothing to resume")
            return done
        run, state, changes = _resumed_run(run_dir, list(overrides), device, allow_other_data, log)
        for p in remove_leftovers(run_dir):  # everything checked: the first change
            log(f"removed {p}, left by an interrupted write")
        if changes:
            _record_changes(run, changes, log)
        dropped = truncate_metrics(run_dir, run.progress["epoch"])
        if dropped:
            log(f"{run_dir / METRICS}: dropped {dropped} lines written after epoch {run.progress['epoch']} "
                "(last.pt's) or left partial")
        set_rng_state(state["rng"])
        log(f"resumed {run_dir} after epoch {run.progress['epoch']}")
        return _run(run, True, quiet, log)


def _run(run: _Run, resumed: bool, quiet: bool, log: _TrainLog) -> dict[str, Any]:
    """What a new run and a resume share once their files are in place: env.json, the epochs, the finish."""
    log(run.evaluator.dataset.summary())
    log.release()
    record_env(run.dir, environment(run.evaluator.device), resumed)
    try:
        _loop(run, quiet, log)
        return _finish(run, log)
    except MSIError as e:  # the console's last line (the CLI prints it), kept with the others
        append_log(run.dir, f"error: {e}")
        raise


class _TrainLog:
    """A line to the console unless ``quiet``, and to ``train.log``, where the lines wait until ``release``: a run
    refused before its first file changes leaves no train.log line behind."""

    def __init__(self, run_dir: Path, quiet: bool) -> None:
        self.run_dir, self.quiet = run_dir, quiet
        self.held: list[str] | None = []

    def __call__(self, *parts: Any) -> None:
        line = " ".join(str(x) for x in parts)
        if not self.quiet:
            tqdm.write(line)
        if self.held is not None:
            self.held.append(line)
        else:
            append_log(self.run_dir, line)

    def release(self) -> None:
        for line in self.held or []:
            append_log(self.run_dir, line)
        self.held = None


def _run_dir(cfg: Config, out: str | Path | None) -> Path:
    """``out``, or ``<train.out_dir>/<train.run_name>`` (empty name: ``<data>-<model>-<time>``)."""
    if out is not None:
        return check_file_name(out, "run directory")
    name = cfg.train.run_name or f"{cfg.data.name}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name  # train.run_name is one folder name (msi.config.validate)


def _finished(run_dir: Path, log: Log) -> dict[str, Any] | None:
    """The results.json of a finished run, or None; a damaged one counts as not finished (the run is scored again)."""
    try:
        return read_results(run_dir)
    except DamagedRunFile as e:
        log(f"{e}; the run counts as unfinished and is scored again")
        return None


def _new_run(cfg: Config, run_dir: Path, device: str | None, quiet: bool, model: Recommender | None,
             data: Dataset | None) -> _Run:
    """A new run's device, data set, model (``model`` and ``data`` when given) and optimizer, all checked; nothing
    is written in ``run_dir``."""
    dev = resolve_device(device or cfg.train.device)
    check_tensorboard(cfg.train.tensorboard)
    seed_everything(cfg.train.seed)
    dataset = data if data is not None else dataset_for(cfg, progress=not quiet)
    _check_splits(dataset)
    if model is not None:
        _check_model_fits(model, cfg, dataset)
    else:
        model = build_model(cfg, dataset)
    model = model.to(dev)  # a Module moves in place: a model passed in is the very object trained
    pairs = torch.from_numpy(dataset.train).to(dev)
    check_contract(model, pairs[: cfg.train.batch_size], dataset.n_users, dataset.n_items, cfg.model.name)
    progress = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "bad_evals": 0, "stopped": False,
                "train_seconds": 0.0}
    return _Run(run_dir, cfg, model, _optimizer(model, cfg), Evaluator.from_config(dataset, dev, cfg),
                pairs, data_signature(dataset), progress, 0)


def _optimizer(model: Recommender, cfg: Config) -> torch.optim.Optimizer | None:
    """Adam over the trainable parameters, or None for a model with none (popularity: it trains no epoch)."""
    return make_optimizer(model, cfg.train.lr) if any(p.requires_grad for p in model.parameters()) else None


def _resumed_run(run_dir: Path, overrides: list[str], device: str | None, allow_other_data: bool,
                 log: Log) -> tuple[_Run, dict[str, Any], list[str]]:
    """The run restored from last.pt with ``overrides`` applied, all checked; nothing is written in ``run_dir``.
    Returns the run, last.pt's payload and the changes the overrides make."""
    model, saved, dataset, state = open_run(run_dir / LAST, allow_other_data=allow_other_data)
    missing = [k for k in ("optimizer", "rng", "progress") if k not in state]
    if missing:
        raise CheckpointError(f"{run_dir / LAST}: not a resumable checkpoint: it lacks {', '.join(missing)} "
                              "(a best.pt copied over last.pt?); start over with --overwrite")
    _warn_hand_edits(run_dir, saved)
    cfg, changes = resume_config(saved, overrides)
    progress = {**state["progress"]}
    if cfg.train.epochs < progress["epoch"]:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: {run_dir} has already trained {progress['epoch']} "
                          "epochs")
    progress["stopped"] = progress["bad_evals"] >= cfg.train.patience
    dev = resolve_device(device or cfg.train.device)
    check_tensorboard(cfg.train.tensorboard)
    _check_splits(dataset)
    model = model.to(dev)
    optimizer = _optimizer(model, cfg)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:  # a state of other parameters or shapes
        raise CheckpointError(f"{run_dir / LAST}: not an msi checkpoint: its optimizer state does not fit "
                              f"the model ({str(e).splitlines()[0]})") from None
    model.train()
    run = _Run(run_dir, cfg, model, optimizer, Evaluator.from_config(dataset, dev, cfg),
               torch.from_numpy(dataset.train).to(dev), data_signature(dataset), progress, progress["epoch"])
    return run, state, changes


def _warn_hand_edits(run_dir: Path, saved: Config) -> None:
    """Warn when config.yaml is missing or differs from last.pt's config (a hand edit): last.pt's is the one used,
    and config.yaml is written from it again."""
    path = run_dir / CONFIG
    if not path.is_file():
        warn(f"{path}: missing; the run goes on with last.pt's config and writes it there again")
        return
    try:
        differ = changed_keys(read_config(run_dir), saved)
    except ConfigError as e:
        warn(f"{e}; the run goes on with last.pt's config and writes config.yaml again")
        return
    if differ:
        verb = "differs" if len(differ) == 1 else "differ"
        warn(f"{path}: {', '.join(differ)} {verb} from last.pt's config (edited by hand?); the run goes on with "
             "last.pt's, and config.yaml is written from it again: change how long or how often with --resume "
             "RUN key=value")


def _record_changes(run: _Run, changes: list[str], log: Log) -> None:
    """config.yaml and train.log record a resume's changes; a finished run so reopened is unfinished until its
    new end: its results.json goes."""
    write_config(run.dir, run.cfg)
    log(f"resume with {', '.join(changes)} (config.yaml updated)")
    if (run.dir / RESULTS).is_file():
        (run.dir / RESULTS).unlink()
        log(f"{run.dir / RESULTS} removed: the run is written again at its new end")
    p = run.progress
    if p["stopped"]:
        log(f"it stopped early at epoch {p['epoch']} ({p['bad_evals']} evaluations without a better valid "
            f"{run.cfg.train.metric}); only a larger train.patience trains it further")


def _check_splits(dataset: Dataset) -> None:
    for split in ("valid", "test"):  # before an epoch is spent
        if len(dataset.split(split)) == 0:
            raise DataError(f"{dataset.path / f'{dataset.name}.inter'}: the {split} split is empty (no rows of "
                            "users with train rows): nothing to select on or score")


def _check_model_fits(model: Recommender, cfg: Config, dataset: Dataset) -> None:
    """A model passed to ``train`` must be the one ``cfg`` describes for ``dataset`` (the same parameter names and
    shapes), or its checkpoints could not be opened with the saved config."""
    with torch.random.fork_rng(devices=[]):  # the reference draws its initial weights: leave the seeded RNG as is
        want = {k: tuple(v.shape) for k, v in build_model(cfg, dataset, with_features=False).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise MSIError(f"the model passed to train() is not the one the config describes for data set "
                       f"{dataset.name} (parameters differ: {diff}); build it with build_model(cfg, data)")



def _loop(run: _Run, quiet: bool, log: Log) -> None:
    """Epochs until train.epochs or early stopping; valid every train.eval_every; best.pt and last.pt."""
    t, p = run.cfg.train, run.progress
    start, seconds_before = time.time(), p["train_seconds"]
    epochs = range(p["epoch"], t.epochs) if not p["stopped"] else range(0)
    if run.optimizer is None:  # nothing to train: scored once, and a resumed run is only finished again
        if p["best_metric"] == -math.inf:
            _score_as_is(run, log)
        return
    tensorboard = TensorBoardLog(run.dir, t.tensorboard)
    if epochs:
        log(f"one line per evaluated epoch: mean train loss, valid metrics, and * when valid {t.metric} is the "
            "best so far (saved as best.pt)")
    try:
        for epoch in progress_bar(epochs, desc="epochs", show=not quiet, initial=p["epoch"], total=t.epochs):
            run.model.start_epoch(epoch)
            row = run_epoch(run.model, run.optimizer, run.pairs, t.batch_size, epoch, quiet, t.autocast == "bf16")
            terms = [k for k in row if k not in ("epoch", "epoch_seconds")]  # run_epoch's mean loss terms
            bad = first_non_finite(run.model.state_dict())
            if bad is not None:
                raise TrainingDiverged(
                    f"weight {bad} became NaN or inf in epoch {epoch + 1} (train.lr={t.lr}); the run stops "
                    f"here, and the checkpoints written before this epoch are kept"
                )
            row.update(epoch_diagnostics(run.model))
            p["epoch"] = epoch + 1
            if (epoch + 1) % t.eval_every == 0:
                _validate(run, row, log)
            p["train_seconds"] = seconds_before + time.time() - start
            append_metrics(run.dir, row, terms)
            tensorboard.log({**row, "terms": terms})
            p["stopped"] = p["bad_evals"] >= t.patience
            if p["stopped"] or (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
                _save(run, "last.pt")
            if p["stopped"]:
                log(f"early stop: no better valid {t.metric} for {t.patience} evaluations")
                break
    except KeyboardInterrupt:
        if run.saved_epoch == 0:  # no epoch row: the run's files go (train); rows without last.pt stay
            raise Interrupted(f"interrupted before {run.dir / 'last.pt'} was first written, so there is nothing to "
                              f"resume: start the run again{' with --overwrite' if p['epoch'] else ''}") from None
        raise Interrupted(
            f"interrupted; {run.dir / 'last.pt'} holds epoch {run.saved_epoch}: continue with "
            f"msi-train --resume {run.dir}"
        ) from None
    finally:
        tensorboard.close()


def _validate(run: _Run, row: dict[str, Any], log: Log) -> None:
    """Score valid, add it to the epoch's row, keep best.pt and the early-stopping count."""
    t, p = run.cfg.train, run.progress
    t0 = time.time()
    valid = run.evaluator(run.model, "valid")
    row.update(eval_seconds=time.time() - t0, valid=valid)
    improved = improves(valid[t.metric], p["best_metric"])
    if improved:
        p.update(best_metric=valid[t.metric], best_epoch=p["epoch"], bad_evals=0)
        _save(run, "best.pt")
    else:
        p["bad_evals"] += 1
    log(f"epoch {p['epoch']}: loss={row['loss']:.4f} valid {_fmt(valid)}{' *' if improved else ''} "
        f"({row['epoch_seconds']:.1f}s + {row['eval_seconds']:.1f}s eval)")


def _score_as_is(run: _Run, log: Log) -> None:
    """A model with no trainable parameters (popularity) trains no epoch: valid is scored once, as epoch 0, into
    metrics.jsonl, best.pt and last.pt, and the run is over (train.epochs and train.patience do not apply)."""
    p, t0 = run.progress, time.time()
    valid = run.evaluator(run.model, "valid")
    p.update(best_metric=valid[run.cfg.train.metric], best_epoch=0, stopped=True)
    _save(run, BEST)
    _save(run, LAST)
    append_metrics(run.dir, {"epoch": 0, "eval_seconds": time.time() - t0, "valid": valid}, [])
    log(f"{run.cfg.model.name} has no trainable parameters: no epoch to train; valid {_fmt(valid)} (scored as it is)")


def _save(run: _Run, name: str) -> None:
    """last.pt can resume a run (optimizer and RNG states); best.pt holds what evaluation needs."""
    payload = {"config": run.cfg.to_dict(), "model": run.model.state_dict(), "epoch": run.progress["epoch"],
               "progress": dict(run.progress), "data": run.signature}
    if name == "last.pt":
        optimizer = run.optimizer.state_dict() if run.optimizer is not None else {"state": {}, "param_groups": []}
        payload.update(optimizer=optimizer, rng=rng_state())
    save_checkpoint(run.dir / name, payload)
    if name == "last.pt":
        run.saved_epoch = run.progress["epoch"]



def _fmt(metrics: dict[str, float], keys: tuple[str, ...] = ("recall", "ndcg")) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.split("@")[0] in keys)


def _finish(run: _Run, log: Log) -> dict[str, Any]:
    """Score valid and test once with best.pt (opened like any checkpoint) and write ``results.json``."""
    best_path = run.dir / BEST
    if not best_path.is_file() and run.progress["best_epoch"]:
        raise CheckpointError(f"{best_path}: not found, though epoch {run.progress['best_epoch']} scored best on "
                              "valid and was saved there (deleted or moved?): put it back to finish the run, or "
                              "start over with --overwrite")
    if not best_path.is_file():
        raise MSIError(f"{run.dir}: no evaluation ran, so there is no best checkpoint")
    model = open_run(best_path, run.evaluator.device, dataset=run.evaluator.dataset).model
    p = run.progress
    results = {
        "best_epoch": p["best_epoch"],
        "epochs_run": p["epoch"],
        "valid": run.evaluator(model, "valid"),
        "test": run.evaluator(model, "test"),
        "train_seconds": p["train_seconds"],
        "selected_by": f"valid {run.cfg.train.metric}",
        "run_dir": str(run.dir),  # absolute (train makes it so)
        "popularity": popularity_metrics(run.evaluator),  # the floor: items ranked by their train count
    }
    write_results(run.dir, results)
    log(f"best epoch {results['best_epoch']}: valid {_fmt(results['valid'])} | test {_fmt(results['test'])}")
    return results

"""The training loop (SPEC §3): Adam over shuffled positive pairs, validation, early stopping, checkpoints.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch), ``best.pt`` (the best valid
metric so far), ``last.pt`` (the end of the last finished epoch, for ``--resume``), ``results.json`` (the test
split scored once, at the end, with the best checkpoint), ``env.json`` and ``train.log`` (every line the console
shows, also when quiet). Nothing is ever chosen by a test score. Its files are read and written by ``msi.rundir``.

A run directory is never clobbered: one that holds files is refused unless the run resumes it or is told to
overwrite it, and ``.lock`` (an exclusive ``flock`` held while the run lives, removed at its end) refuses a second
live process.
``train`` reads as three steps: ``_setup`` (directory, data, model), ``_loop`` (epochs) and ``_finish`` (test).
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

from msi.checkpoint import first_non_finite, rng_state, save_checkpoint, set_rng_state
from msi.config import Config
from msi.console import progress_bar
from msi.data.dataset import Dataset
from msi.errors import CheckpointError, ConfigError, DataError, Interrupted, MSIError
from msi.evaluate import Evaluator, popularity_metrics
from msi.models import Recommender, build_model, epoch_diagnostics
from msi.runinfo import TensorBoardLog, write_env
from msi.run import data_signature, dataset_for, open_run, resolve_device, seed_everything
from msi.rundir import (BEST, LAST, METRICS, RESULTS, DamagedRunFile, append_log, append_metrics,
                        clear_for_new_run, locked, read_results, remove_files, remove_leftovers, resume_config,
                        truncate_metrics, unstarted_run, write_atomic, write_config, write_results)

Log = Callable[..., None]


class TrainingDiverged(MSIError):
    """The loss or the weights became NaN or inf; the checkpoints written before stay as they were."""


@dataclass
class _Run:
    """What the loop and the finish step share."""

    dir: Path
    cfg: Config
    model: Recommender
    optimizer: torch.optim.Optimizer | None  # None: the model has no trainable parameters (popularity)
    evaluator: Evaluator
    pairs: torch.Tensor  # (n, 2) train (user, item) rows on the device
    signature: dict[str, Any]  # msi.run.data_signature, saved in every checkpoint
    progress: dict[str, Any]  # epoch, best_metric, best_epoch, bad_evals, stopped, train_seconds (in last.pt)
    saved_epoch: int  # the epoch last.pt holds


def train(
    cfg: Config | None, out: str | Path | None = None, resume: str | Path | None = None, overwrite: bool = False,
    quiet: bool = False, device: str | None = None, allow_other_data: bool = False,
    model: Recommender | None = None, data: Dataset | None = None, overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model, select on valid, score test once; returns the contents of ``results.json``.

    ``model`` and ``data``: train this very model object (built by ``build_model(cfg, data)``) on this data set
    instead of building them from ``cfg`` (not with ``resume``).

    ``out``: the run directory (default ``<train.out_dir>/<run name>``); it must be empty or missing unless
    ``overwrite`` (its run files are removed first). ``resume``: a run directory to continue from its last.pt
    with its saved config (``cfg`` is then None); a finished run returns its results.json as it is.
    ``overrides``: with ``resume``, ``key=value`` changes of ``msi.rundir.RESUME_KEYS`` only (how long and how
    often); a finished run given more epochs (or more patience, when it stopped early) trains on, and its
    results.json is written again at the new end. ``allow_other_data``: resume on data of the same shape but
    another fingerprint. Every console line also goes to the run's train.log, also when ``quiet``.
    """
    if resume is not None and (model is not None or data is not None):
        raise MSIError("train(resume=...) continues the saved model on its saved data: pass no model= or data=")
    if overrides and resume is None:
        raise MSIError("train(overrides=...) changes a resumed run; for a new run put them in cfg")
    run_dir = Path(os.path.abspath(resume if resume is not None else _run_dir(cfg, out)))
    if resume is not None and not (run_dir / LAST).is_file():
        raise CheckpointError(f"{run_dir / LAST}: checkpoint not found; nothing to resume")
    log = _TrainLog(run_dir, quiet, hold=resume is None)
    created = resume is None and not run_dir.exists()
    try:
        with locked(run_dir):
            if resume is not None and not overrides and (done := _finished(run_dir, log)) is not None:
                if not quiet:  # the console only: resuming a finished run changes nothing in it
                    tqdm.write(f"{run_dir} is finished (results.json); nothing to resume")
                return done
            released = False
            try:
                run = _setup(cfg, run_dir, resume is not None, overwrite, device, quiet, allow_other_data, log,
                             model, data, overrides or [])
                log.release()
                released = True
                _loop(run, quiet, log)
                return _finish(run, log)
            except BaseException as e:
                if resume is None and (names := unstarted_run(run_dir)) is not None:
                    remove_files(run_dir, names)  # a new run that never finished an epoch leaves nothing behind
                elif released and isinstance(e, MSIError):  # the console's last line (the CLI prints it), kept
                    append_log(run_dir, f"error: {e}")
                raise
    except BaseException:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # nor the folder it made: the corrected command starts as if it had not run
        raise


class _TrainLog:
    """A line to the console unless ``quiet``, and to ``train.log``. With ``hold`` (a new run) the lines wait until
    ``release`` (after _setup wrote config.yaml): a run refused or failing before that leaves no train.log behind,
    so its directory stays as empty as it was and the corrected command can start there."""

    def __init__(self, run_dir: Path, quiet: bool, hold: bool) -> None:
        self.run_dir, self.quiet = run_dir, quiet
        self.held: list[str] | None = [] if hold else None

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
        return Path(out)
    name = cfg.train.run_name or f"{cfg.data.name}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def _finished(run_dir: Path, log: Log) -> dict[str, Any] | None:
    """The results.json of a finished run, or None; a damaged one counts as not finished (the run is scored again)."""
    try:
        return read_results(run_dir)
    except DamagedRunFile as e:
        log(f"{e}; the run counts as unfinished and is scored again")
        return None


def _resume_with(run_dir: Path, cfg: Config, overrides: list[str], progress: dict[str, Any], log: Log) -> Config:
    """The saved config with a resume's overrides (``msi.rundir.resume_config``), recorded in config.yaml and
    train.log; ``progress`` (last.pt's) stops early or not by the new patience. A finished run so reopened is
    unfinished until its new end: its results.json goes."""
    new, changes = resume_config(cfg, overrides)
    if not changes:
        return cfg
    if new.train.epochs < progress["epoch"]:
        raise ConfigError(f"train.epochs={new.train.epochs}: {run_dir} has already trained {progress['epoch']} epochs")
    progress["stopped"] = progress["bad_evals"] >= new.train.patience
    write_config(run_dir, new)
    log(f"resume with {', '.join(changes)} (config.yaml updated)")
    if (run_dir / RESULTS).is_file():
        (run_dir / RESULTS).unlink()
        log(f"{run_dir / RESULTS} removed: the run is written again at its new end")
    if progress["stopped"]:
        log(f"it stopped early at epoch {progress['epoch']} ({progress['bad_evals']} evaluations without a better "
            f"valid {new.train.metric}); only a larger train.patience trains it further")
    return new


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


def _setup(
    cfg: Config | None, run_dir: Path, resume: bool, overwrite: bool, device: str | None, quiet: bool,
    allow_other_data: bool, log: Log, model: Recommender | None = None, data: Dataset | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> _Run:
    """The run directory, data set, model, optimizer and progress: fresh (``model`` and ``data`` when given), or
    restored from last.pt."""
    progress = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "bad_evals": 0, "stopped": False,
                "train_seconds": 0.0}
    if resume:
        for p in remove_leftovers(run_dir):
            log(f"removed {p}, left by an interrupted write")
        model, cfg, dataset, state = open_run(run_dir / LAST, allow_other_data=allow_other_data)
        missing = [k for k in ("optimizer", "rng", "progress") if k not in state]
        if missing:
            raise CheckpointError(f"{run_dir / LAST}: not a resumable checkpoint: it lacks {', '.join(missing)} "
                                  "(a best.pt copied over last.pt?); start over with --overwrite")
        cfg = _resume_with(run_dir, cfg, list(overrides), state["progress"], log)
    else:
        removed = clear_for_new_run(run_dir, overwrite)
        if removed:
            log(f"removed {', '.join(removed)} from {run_dir}{' (--overwrite)' if overwrite else ''}")
        seed_everything(cfg.train.seed)
        dataset = data if data is not None else dataset_for(cfg, progress=not quiet)
        if model is not None:
            _check_model_fits(model, cfg, dataset)
        else:
            model = build_model(cfg, dataset)
    dev = resolve_device(device or cfg.train.device)
    model = model.to(dev)  # a Module moves in place: a model passed in is the very object trained
    trainable = any(p.requires_grad for p in model.parameters())
    optimizer = make_optimizer(model, cfg.train.lr) if trainable else None
    if resume and optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # a state of other parameters or shapes
            raise CheckpointError(f"{run_dir / LAST}: not an msi checkpoint: its optimizer state does not fit "
                                  f"the model ({str(e).splitlines()[0]})") from None
    if resume:
        progress.update(state["progress"])
        set_rng_state(state["rng"])
        dropped = truncate_metrics(run_dir, progress["epoch"])
        if dropped:
            log(f"{run_dir / METRICS}: dropped {dropped} lines written after epoch {progress['epoch']} (last.pt's) "
                "or left partial")
        log(f"resumed {run_dir} after epoch {progress['epoch']}")
    log(dataset.summary())
    for split in ("valid", "test"):  # before an epoch is spent
        if len(dataset.split(split)) == 0:
            raise DataError(f"{dataset.path / f'{dataset.name}.inter'}: the {split} split is empty (no rows of "
                            "users with train rows): nothing to select on or score")
    if not resume:
        write_config(run_dir, cfg)
        write_atomic(run_dir / METRICS, "")
    write_env(run_dir, dev, resumed=resume)
    evaluator = Evaluator(dataset, dev, cfg.eval.ks, cfg.eval.batch_users, cfg.eval.mask_valid_at_test)
    pairs = torch.from_numpy(dataset.train).to(dev)
    return _Run(run_dir, cfg, model, optimizer, evaluator, pairs, data_signature(dataset), progress,
                progress["epoch"])


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
    improved = valid[t.metric] > p["best_metric"]
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


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, no weight decay; fused=True: one pass over each parameter, the per-tensor loop's numbers up to
    rounding (tests/test_train.py's pinned trajectory), 5x faster on the CPU over the raw features."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def run_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, pairs: torch.Tensor, batch_size: int,
    epoch: int, quiet: bool = True, bf16: bool = False,
) -> dict[str, Any]:
    """One pass over the shuffled train pairs (n, 2); returns the mean of every loss term and the time.

    Each batch: zero_grad, the loss (under bfloat16 autocast with ``bf16``: the forward pass and the loss only,
    as nanoGPT does), backward, the Adam step. zero_grad comes first so the last step's gradients are still there
    for ``epoch_diagnostics``.
    """
    model.train()
    t0 = time.time()
    perm = torch.randperm(len(pairs)).to(pairs.device)
    sums: dict[str, torch.Tensor] = {}
    n_batches = math.ceil(len(pairs) / batch_size)
    losses = torch.empty(n_batches, device=pairs.device)  # checked once per epoch: no GPU sync per step
    for b in progress_bar(range(n_batches), desc=f"epoch {epoch + 1}", leave=False, show=not quiet):
        batch = pairs[perm[b * batch_size : (b + 1) * batch_size]]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(pairs.device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = model.loss(batch[:, 0], batch[:, 1])
        terms["loss"].backward()
        optimizer.step()
        losses[b] = terms["loss"].detach()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
    bad = torch.nonzero(~torch.isfinite(losses))
    if len(bad):
        b = int(bad[0])
        raise TrainingDiverged(
            f"loss is {losses[b].item()} at epoch {epoch + 1}, batch {b + 1}; the run stops here, and the "
            "checkpoints written before this epoch are kept"
        )
    row = {k: float(v) / n_batches for k, v in sums.items()}
    row.update(epoch=epoch + 1, epoch_seconds=time.time() - t0)
    return row


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

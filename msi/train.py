"""The training loop (SPEC §3): Adam over shuffled positive pairs, validation, early stopping, checkpoints.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch), ``best.pt`` (the best valid
metric so far), ``last.pt`` (the end of the last finished epoch, for ``--resume``) and ``results.json`` (the test
split scored once, at the end, with the best checkpoint). Nothing is ever chosen by a test score.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from msi.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from msi.config import Config, config_from_dict, dump_config
from msi.errors import MSIError
from msi.evaluate import Evaluator
from msi.models import build_model, epoch_diagnostics
from msi.run import data_signature, dataset_for, resolve_device, seed_everything
from msi.step import TrainStep


class TrainingDiverged(MSIError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def _run_dir(cfg: Config, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    name = cfg.train.run_name or f"{cfg.data.name}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def _fmt(metrics: dict[str, float], keys: tuple[str, ...] = ("recall", "ndcg")) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.split("@")[0] in keys)


def train(
    cfg: Config, out: str | Path | None = None, resume: str | Path | None = None, quiet: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model, select on valid, score test once; returns the contents of ``results.json``."""
    log = (lambda *a: None) if quiet else (lambda *a: tqdm.write(" ".join(str(x) for x in a)))
    if resume is not None:
        run_dir = Path(resume)
        state = load_checkpoint(run_dir / "last.pt")
        cfg = config_from_dict(state["config"])
    else:
        run_dir, state = _run_dir(cfg, out), None
    dev = resolve_device(device or cfg.train.device)
    seed_everything(cfg.train.seed)
    dataset = dataset_for(cfg, progress=not quiet)
    log(dataset.summary())
    model = build_model(cfg, dataset).to(dev)
    optimizer = make_optimizer(model, cfg.train.lr)
    evaluator = Evaluator(dataset, dev, cfg.eval.ks, cfg.eval.batch_users, cfg.eval.mask_valid_at_test)
    train_pairs = torch.from_numpy(dataset.train).to(dev)
    t = cfg.train
    progress = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "bad_evals": 0}
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = dict(state["progress"])
        set_rng_state(state["rng"])
        _truncate_log(metrics_path, progress["epoch"])
        log(f"resumed {run_dir} after epoch {progress['epoch']}")
    else:
        metrics_path.write_text("")

    last_saved = [progress["epoch"]]
    step = TrainStep(model, optimizer, cuda_graph=t.cuda_graph and t.autocast == "off")  # after the resume load

    def checkpoint(name: str) -> None:
        """last.pt can resume a run (optimizer and RNG states); best.pt holds what evaluation needs."""
        payload = {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": progress["epoch"],
                   "progress": dict(progress), "data": data_signature(dataset)}
        if name == "last.pt":
            last_saved[0] = progress["epoch"]
            payload.update(optimizer=optimizer.state_dict(), rng=rng_state())
        save_checkpoint(run_dir / name, payload)

    start = time.time()
    epochs = tqdm(range(progress["epoch"], t.epochs), desc="epochs", disable=quiet, initial=progress["epoch"],
                  total=t.epochs)
    try:
        for epoch in epochs:
            model.start_epoch(epoch)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.autocast == "bf16"):
                row = _train_epoch(model, optimizer, train_pairs, t.batch_size, epoch, quiet, step)
            row.update(epoch_diagnostics(model))
            progress["epoch"] = epoch + 1
            if (epoch + 1) % t.eval_every == 0:
                t0 = time.time()
                valid = evaluator(model, "valid")
                row.update(eval_seconds=time.time() - t0, valid=valid)
                improved = valid[t.metric] > progress["best_metric"]
                if improved:
                    progress.update(best_metric=valid[t.metric], best_epoch=epoch + 1, bad_evals=0)
                    checkpoint("best.pt")
                else:
                    progress["bad_evals"] += 1
                log(f"epoch {epoch + 1}: loss={row['loss']:.4f} valid {_fmt(valid)}"
                    f"{' *' if improved else ''} ({row['epoch_seconds']:.1f}s + {row['eval_seconds']:.1f}s eval)")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            stop = progress["bad_evals"] >= t.patience
            if stop or (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
                checkpoint("last.pt")
            if stop:
                log(f"early stop: no better valid {t.metric} for {t.patience} evaluations")
                break
    except KeyboardInterrupt:
        raise MSIError(
            f"interrupted; {run_dir / 'last.pt'} holds epoch {last_saved[0]}: continue with "
            f"msi-train --resume {run_dir}"
        ) from None
    return _finish(run_dir, evaluator, cfg, dev, progress, time.time() - start, log)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, no weight decay; fused=True: one pass over each parameter, the per-tensor loop's numbers up to
    rounding (tests/test_step.py), 5x faster on the CPU over the raw features."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def _train_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, pairs: torch.Tensor, batch_size: int,
    epoch: int, quiet: bool, step: TrainStep | None = None,
) -> dict[str, Any]:
    """One pass over the shuffled train pairs (n, 2); returns the mean of every loss term and the time.
    ``step`` runs each batch (default: an eager ``TrainStep``)."""
    step = step or TrainStep(model, optimizer)
    model.train()
    t0 = time.time()
    perm = torch.randperm(len(pairs)).to(pairs.device)
    sums: dict[str, torch.Tensor] = {}
    n_batches = math.ceil(len(pairs) / batch_size)
    losses = torch.empty(n_batches, device=pairs.device)  # checked once per epoch: no GPU sync per step
    for b in tqdm(range(n_batches), desc=f"epoch {epoch + 1}", leave=False, disable=quiet):
        batch = pairs[perm[b * batch_size : (b + 1) * batch_size]]
        terms = step(batch)
        losses[b] = terms["loss"]
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
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


def _truncate_log(path: Path, epoch: int) -> None:
    """Drop metric rows written after the checkpoint being resumed from."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epoch]
    path.write_text("".join(r + "\n" for r in rows))


def _finish(
    run_dir: Path, evaluator: Evaluator, cfg: Config, dev: torch.device, progress: dict, seconds: float, log,
) -> dict[str, Any]:
    """Score test once with the best checkpoint and write ``results.json``."""
    best_path = run_dir / "best.pt"
    if not best_path.is_file():
        raise MSIError(f"{run_dir}: no evaluation ran, so there is no best checkpoint (train.eval_every > epochs?)")
    best = load_checkpoint(best_path)
    model = build_model(cfg, evaluator.dataset, with_features=False)
    model.load_state_dict(best["model"])
    model.to(dev)
    results = {
        "best_epoch": progress["best_epoch"],
        "epochs_run": progress["epoch"],
        "valid": evaluator(model, "valid"),
        "test": evaluator(model, "test"),
        "train_seconds": seconds,
        "selected_by": f"valid {cfg.train.metric}",
        "run_dir": str(run_dir),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"best epoch {results['best_epoch']}: valid {_fmt(results['valid'])} | test {_fmt(results['test'])}")
    return results

"""The timing core of scripts/bench.py: the bench data sets, clocks and memory, the FLOP count, one model's figures.

A step is timed through the trainer's own code: ``msi.train.run_epoch`` on one batch (the one public epoch loop;
its per-call overhead, a shuffle of the batch and one finiteness check, is small beside a step). The parts of a step
(forward, backward, Adam) are timed apart by ``phase_ms``, synchronized between them. Configs come from
``msi.config.load_config`` with ``key=value`` overrides, validated like every other caller's.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from msi.config import Config, load_config
from msi.data.dataset import Dataset, load_dataset
from msi.data.graph import normalized_adjacency
from msi.data.synth import generate
from msi.evaluate import Evaluator
from msi.models import MSI, VBPR, LightGCN, Recommender, build_model
from msi.models.base import lightgcn_readout
from msi.train import make_optimizer, run_epoch

DATASETS = ("baby", "sports", "tiktok", "elec")
MODELS = {  # bench name -> overrides of the Config defaults
    "msi": ["model.name=msi"],
    "bm3": ["model.name=msi", "model.use_ssd=false", "model.use_ip=false", "loss.w_align=2.0", "loss.w_mask=2.0"],
    "lightgcn": ["model.name=lightgcn"],
    "bpr": ["model.name=bpr"],
    "vbpr": ["model.name=vbpr"],
    "mmgcn": ["model.name=mmgcn"],
    "grcn": ["model.name=grcn"],
    "grcn-r0": ["model.name=grcn", "model.n_routing=0"],  # MMRec's arithmetic: its routing changes nothing
    "dualgnn": ["model.name=dualgnn"],
    "lattice": ["model.name=lattice"],
    "freedom": ["model.name=freedom"],
    "buir": ["model.name=buir"],
}  # bm3 is SPEC §2's "w/o S & I" with BM3's loss weights
REAL_FEATURES = {"baby": (7050, {"image": 4096, "text": 384}), "sports": (18357, {"image": 4096, "text": 384})}
TIKTOK_MODALITIES = {"image": "image_feat.npy", "audio": "audio_feat.npy"}
SYNTH_MODALITIES = {"image": "image_feat.npy", "text": "text_feat.npy"}
MB = 2**20


# ----------------------------------------------------------------------------------------------- data sets
def load_bench_dataset(name: str, shared: Path, cache: Path, elec_preset: str, seed: int) -> Dataset | None:
    """The ``msi.data.dataset.Dataset`` behind a bench name, or None (with a message) when its files are missing."""
    if name == "elec":
        return _generated(elec_preset, cache)
    if not (shared / name / f"{name}.inter").is_file():
        print(f"skip {name}: {shared / name / f'{name}.inter'} not found (see --shared-data)", flush=True)
        return None
    if name == "tiktok":
        return load_dataset(shared, name, TIKTOK_MODALITIES)
    dataset = load_dataset(shared, name)
    rows, widths = REAL_FEATURES[name]
    if dataset.n_items != rows:
        print(f"note: {name} has {dataset.n_items} items, the real feature files {rows} rows", flush=True)
    rng = np.random.default_rng(seed)  # random values of the real widths, in memory only
    dataset.features = {m: rng.standard_normal((dataset.n_items, w), dtype=np.float32) for m, w in widths.items()}
    return dataset


def _generated(preset: str, cache: Path) -> Dataset:
    """The generated preset from ``cache/<preset>``, written there first (via a temporary folder) when missing."""
    folder = cache / preset
    if not (folder / f"{preset}.inter").is_file():
        partial = cache / f"{preset}.partial"
        print(f"generating the {preset!r} preset into {folder} (once; reused from then on) ...", flush=True)
        generate(preset, partial, seed=0, name=preset)
        partial.rename(folder)
    return load_dataset(cache, preset, SYNTH_MODALITIES)


# ----------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_peak(device: torch.device) -> tuple[float, bool]:
    """Start a memory phase: reset the peak counter; returns (memory now in MB, whether the peak is per phase).

    CPU: writing 5 to /proc/self/clear_refs resets the process's peak RSS (Linux >= 4.0); where that fails the
    peak is the process-lifetime one. CUDA: ``reset_peak_memory_stats``, and memory means allocated bytes.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MB, True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        per_phase = True
    except OSError:
        per_phase = False
    return _status_mb("VmRSS") or 0.0, per_phase


def peak_mb(device: torch.device) -> float:
    """Peak since ``start_peak``: CUDA allocated bytes, or the resident set (ru_maxrss, in KB on Linux, as fallback)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(device: torch.device, n: int, repeats: int) -> float:
    """This machine's dense float32 matmul rate: 2 n^3 flops of an (n, n) @ (n, n) product per median time."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / median_ms(lambda: a @ b, device, repeats) / 1e6


# ----------------------------------------------------------------------------------------------- FLOPs
def step_flops(model: Recommender, batch: int, n_unique: int) -> dict[str, float]:
    """Floating-point work of one training step by part; elementwise work (activations, norms, Adam) is left out.

    Sparse: 2 nnz k per product of Â with k columns, per layer, and the same again backward (Â^T G).
    Dense (m, n) @ (n, p): 2 m n p forward; backward 2x that (grad of the weight and of the input), or 1x where the
    input needs no gradient (frozen raw features).
    """
    if isinstance(model, VBPR):  # E over the 2B positive and negative rows; the features need no gradient
        return {"projection": 2 * 2.0 * 2 * batch * model.proj.in_features * model.proj.out_features}
    if isinstance(model, LightGCN):  # one graph of d columns
        return {"sparse": 4.0 * model.adj._nnz() * model.emb.shape[1] * model.n_layers}
    if not isinstance(model, MSI):  # BPR-MF: row look-ups and row products; the other baselines are not counted
        return {}
    nnz, L = model.adj._nnz(), model.n_layers
    d, n_items, n_mod = model.item_emb.shape[1], model.n_items, len(model.modalities)
    graphs = 1 + (n_mod if model.use_ip else 0)
    out = {"sparse": 4.0 * nnz * graphs * d * L, "projection": 0.0}
    for m in model.modalities:
        fwd = 2.0 * n_items * model.proj[m].in_features * d
        out["projection"] += fwd * (3 if model.raw[m].requires_grad else 2)
    if model.use_ssd:
        out["ssd_heads"] = 3 * n_mod * 2.0 * n_items * d * 2 * d
        out["info_nce"] = 3 * 2.0 * n_unique**2 * d
    out["predictor"] = 3 * 2.0 * (2 + n_mod) * batch * d * d  # online views of u, i and each modality
    return out


# ----------------------------------------------------------------------------------------------- one model
def model_config(name: str, freeze: bool, batch_size: int) -> Config:
    """The Config of a bench model: the defaults with its MODELS overrides, frozen raw features (for the models that
    have the key model.freeze_features: not LightGCN, which has no features) and the batch size."""
    cfg = load_config(overrides=[*MODELS[name], f"train.batch_size={batch_size}"])
    if hasattr(cfg.model, "freeze_features"):
        cfg.model.freeze_features = freeze
    return cfg


def phase_ms(
    model: Recommender, optimizer: torch.optim.Optimizer, next_batch: Callable[[], torch.Tensor],
    device: torch.device, repeats: int,
) -> dict[str, float]:
    """Median ms of the parts of a step, synchronized between them: loss (forward), backward, Adam."""
    times: dict[str, list[float]] = {"forward": [], "backward": [], "adam": []}
    for _ in range(repeats):
        batch = next_batch()
        sync(device)
        t0 = time.perf_counter()
        terms = model.loss(batch[:, 0], batch[:, 1])
        sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        sync(device)
        for part, seconds in zip(times, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            times[part].append(seconds)
    return {part: 1e3 * statistics.median(t) for part, t in times.items()}


def time_epoch(
    model: Recommender, optimizer: torch.optim.Optimizer, pairs: torch.Tensor, batch: int, steps: int | None
) -> tuple[float, int]:
    """Seconds of one epoch with the trainer's loop; with ``steps`` (fewer than an epoch's) time that many steps
    over a random subset of the train pairs and scale up. Returns (epoch seconds, steps timed)."""
    n_batches = math.ceil(len(pairs) / batch)
    timed = n_batches if steps is None else min(steps, n_batches)
    subset = pairs if timed == n_batches else pairs[torch.randperm(len(pairs), device=pairs.device)[: timed * batch]]
    sync(pairs.device)
    t0 = time.perf_counter()
    model.start_epoch(0)  # the per-epoch work the trainer does first (FREEDOM's edge dropping, LATTICE's graph, ...)
    hook = time.perf_counter() - t0
    seconds = run_epoch(model, optimizer, subset, batch, 0)["epoch_seconds"]
    return hook + seconds * n_batches / timed, timed


def time_eval(
    model: Recommender, evaluator: Evaluator, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """(seconds, peak memory in MB) of a full evaluation of the valid users."""
    start_peak(device)
    warmup = args.eval_warmup if args.eval_warmup is not None else int(device.type == "cuda")
    seconds = median_ms(lambda: evaluator(model, "valid"), device, args.eval_repeats, warmup) / 1e3
    return seconds, peak_mb(device)


def bench_model(
    name: str, dataset: Dataset, evaluator: Evaluator, args: argparse.Namespace, device: torch.device, matmul: float
) -> dict[str, Any]:
    """Step, epoch, evaluation and memory of one model on one data set."""
    gc.collect()
    base, per_phase = start_peak(device)
    cfg = model_config(name, args.freeze_features, args.batch_size)
    batch_size = cfg.train.batch_size
    model = build_model(cfg, dataset).to(device)
    optimizer = make_optimizer(model, cfg.train.lr)
    pairs = torch.from_numpy(dataset.train).to(device)
    batches = [pairs[torch.randperm(len(pairs), device=device)[:batch_size]] for _ in range(4)]
    next_batch = itertools.cycle(batches).__next__

    def step() -> None:  # one step of the trainer's loop: run_epoch over one batch
        batch = next_batch()
        run_epoch(model, optimizer, batch, len(batch), 0)

    step_ms = median_ms(step, device, args.repeats, args.warmup)
    phases = phase_ms(model, optimizer, next_batch, device, args.repeats)
    epoch_s, timed = time_epoch(model, optimizer, pairs, batch_size, args.epoch_steps)
    train_peak = peak_mb(device)
    eval_s, eval_peak = time_eval(model, evaluator, args, device)
    flops = step_flops(model, batch_size, len(torch.unique(batches[0][:, 1])))
    n_batches = math.ceil(len(pairs) / batch_size)
    gflops = sum(flops.values()) * n_batches / epoch_s / 1e9 if flops else None  # None: work not counted
    row = {
        "step_ms": step_ms, "phases_ms": phases, "epoch_s": epoch_s, "epoch_steps_timed": timed,
        "steps_per_epoch": n_batches, "epoch_extrapolated": timed < n_batches, "eval_s": eval_s,
        "peak_mem_mb": max(train_peak, eval_peak), "train_peak_mem_mb": train_peak, "eval_peak_mem_mb": eval_peak,
        "mem_before_mb": base, "mem_kind": "cuda_allocated" if device.type == "cuda" else "rss",
        "mem_peak_per_phase": per_phase, "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "gflop_per_epoch": sum(flops.values()) * n_batches / 1e9, "gflops": gflops,
        "matmul_fraction": None if gflops is None else gflops / matmul,
        "freeze_features": getattr(cfg.model, "freeze_features", False),
    }
    if name == "msi":
        row["profile"] = profile_step(step, device, args.profile_top)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_step(step: Callable[[], None], device: torch.device, top: int) -> dict[str, Any]:
    """The ``top`` ops of one training step by self time, in ms and % of the step's wall time.

    On the CPU the clock is CPU self time. On CUDA it is the GPU time of the kernels each op launched, and each row
    also gives the op's CPU self time (launch overhead); ``device_ms`` is the GPU busy time of the whole step.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - t0)
    events = prof.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU]  # kernels are listed apart; count them once
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "cpu_self_ms": e.self_cpu_time_total / 1e3, "pct": 100 * getattr(e, key) / 1e3 / wall_ms}
            for e in sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:top]]
    out = {"wall_ms": wall_ms, "time": "CUDA self" if cuda else "CPU self", "rows": rows,
           "cpu_self_ms": sum(e.self_cpu_time_total for e in ops) / 1e3}
    if cuda:
        out["device_ms"] = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    return out




# ----------------------------------------------------------------------------------------------- graph product
def graph_products(dataset: Dataset, device: torch.device, d: int, n_layers: int, repeats: int) -> dict[str, dict]:
    """Forward + backward of the LightGCN readout: one (N, 3d) product against three (N, d), CSR and COO."""
    n = dataset.n_users + dataset.n_items
    fused = torch.randn(n, 3 * d, device=device, requires_grad=True)
    parts = [torch.randn(n, d, device=device, requires_grad=True) for _ in range(3)]
    grad = torch.randn(n, 3 * d, device=device)
    grads = {3 * d: [grad], d: [g.contiguous() for g in grad.split(d, dim=1)]}

    def run(adj: torch.Tensor, xs: list[torch.Tensor], backward: bool = True) -> None:
        for x, g in zip(xs, grads[xs[0].shape[1]]):
            y = lightgcn_readout(adj, x, n_layers)
            if backward:
                y.backward(g)
                x.grad = None

    out = {}
    csr = normalized_adjacency(dataset.train, dataset.n_users, dataset.n_items)
    for layout_name, adj in (("csr", csr), ("coo", csr.to_sparse_coo().coalesce())):
        adj = adj.to(device)
        out[layout_name] = {
            "fused_ms": median_ms(lambda: run(adj, [fused]), device, repeats),
            "separate_ms": median_ms(lambda: run(adj, parts), device, repeats),
            "fused_forward_ms": median_ms(lambda: run(adj, [fused], backward=False), device, repeats),
        }
    return out


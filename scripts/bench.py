"""Speed and memory of MSI, the BM3 variant and LightGCN at Baby, Sports, TikTok and Elec scale (docs/benchmarks.md).

For every data set and model: the median training step (forward + backward + Adam on a batch of 2048 pairs, after
warm-up), one epoch (timed with the trainer's own loop, ``msi.train.run_epoch``), one full evaluation of the valid
users (``msi.evaluate.Evaluator``) and peak memory. The step and the epoch run through ``msi.step.TrainStep``, as the
trainer does: on CUDA optionally a captured CUDA graph (``--cuda-graph``, experimental, default off; the eager step is timed too, and a capture
that fails is reported while the eager figures are still measured). Per data set also: the fused graph product (one sparse product
over N x 3d) against three N x d products, CSR against COO, and a profile of one MSI step. An analytic count of an
epoch's floating-point work, divided by the epoch time and by this machine's dense float32 matmul rate measured in the
same run, gives the efficiency figure. Results go to JSON and a Markdown table, rewritten after each data set.

Data: ``baby`` and ``sports`` are the real graphs in ``../shared/data`` with generated random features of the real
shapes (their values do not change the cost); ``tiktok`` is the real set (image + audio); ``elec`` is the generated
preset, written once into ``--cache``.

With ``--mmrec-bm3 DIR`` (a copy of ``/work/shared/reference/mmrec-bm3``) MMRec's own BM3 step is timed by its
``time_bm3.py`` in a subprocess on the same device, threads and graph, with random features of the same widths, and
the ratios of our MSI and BM3 steps and epochs to it are written beside.

Example (the README table):
    python scripts/bench.py --datasets baby sports tiktok elec --threads 2 --epoch-steps 20
    python scripts/bench.py --device cuda --datasets baby tiktok --mmrec-bm3 .ref/mmrec-bm3
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from msi.config import Config
from msi.data.dataset import Dataset, load_dataset
from msi.data.graph import normalized_adjacency
from msi.data.synth import generate
from msi.evaluate import Evaluator
from msi.models import MSI, Recommender, build_model
from msi.models.base import lightgcn_readout
from msi.run import resolve_device, seed_everything
from msi.step import TrainStep
from msi.train import make_optimizer, run_epoch

DATASETS = ("baby", "sports", "tiktok", "elec")
MODELS = {  # bench name -> (model.* settings, loss.* settings) on top of the Config defaults
    "msi": ({"name": "msi"}, {}),
    "bm3": ({"name": "msi", "use_ssd": False, "use_ip": False}, {"w_align": 2.0, "w_mask": 2.0}),  # "w/o S & I"
    "lightgcn": ({"name": "lightgcn"}, {}),
}
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
    nnz, L = model.adj._nnz(), model.n_layers
    if not isinstance(model, MSI):  # LightGCN: one graph of d columns
        return {"sparse": 4.0 * nnz * model.emb.shape[1] * L}
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
def model_config(name: str, freeze: bool) -> Config:
    """The Config of a bench model: the defaults plus the settings in MODELS."""
    cfg = Config()
    model_settings, loss_settings = MODELS[name]
    for key, value in model_settings.items():
        setattr(cfg.model, key, value)
    for key, value in loss_settings.items():
        setattr(cfg.loss, key, value)
    cfg.model.freeze_features = freeze and name != "lightgcn"
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
    model: Recommender, optimizer: torch.optim.Optimizer, pairs: torch.Tensor, batch: int, steps: int | None,
    step: TrainStep,
) -> tuple[float, int]:
    """Seconds of one epoch with the trainer's loop; with ``steps`` (fewer than an epoch's) time that many steps
    over a random subset of the train pairs and scale up. Returns (epoch seconds, steps timed)."""
    n_batches = math.ceil(len(pairs) / batch)
    timed = n_batches if steps is None else min(steps, n_batches)
    subset = pairs if timed == n_batches else pairs[torch.randperm(len(pairs), device=pairs.device)[: timed * batch]]
    sync(pairs.device)
    seconds = run_epoch(model, optimizer, subset, batch, 0, quiet=True, step=step)["epoch_seconds"]
    return seconds * n_batches / timed, timed


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
    cfg = model_config(name, args.freeze_features)
    model = build_model(cfg, dataset).to(device)
    optimizer = make_optimizer(model, cfg.train.lr)
    pairs = torch.from_numpy(dataset.train).to(device)
    batches = [pairs[torch.randperm(len(pairs), device=device)[: args.batch_size]] for _ in range(4)]
    next_batch = itertools.cycle(batches).__next__
    model.train()
    fast = TrainStep(model, optimizer, cuda_graph=args.cuda_graph)  # what the trainer runs
    eager = TrainStep(model, optimizer)

    def step(runner: TrainStep = fast) -> None:
        runner(next_batch())

    step_ms = median_ms(step, device, args.repeats, args.warmup)
    graph = {"cuda_graph": fast.cuda_graph, "capture_error": fast.capture_error}
    if fast.cuda_graph or fast.capture_error:  # the eager step beside the captured one (or the failed capture)
        graph["eager_step_ms"] = median_ms(lambda: step(eager), device, args.repeats, args.warmup)
    phases = phase_ms(model, optimizer, next_batch, device, args.repeats)
    epoch_s, timed = time_epoch(model, optimizer, pairs, args.batch_size, args.epoch_steps, fast)
    train_peak = peak_mb(device)
    eval_s, eval_peak = time_eval(model, evaluator, args, device)
    flops = step_flops(model, args.batch_size, len(torch.unique(batches[0][:, 1])))
    n_batches = math.ceil(len(pairs) / args.batch_size)
    gflops = sum(flops.values()) * n_batches / epoch_s / 1e9
    row = {
        "step_ms": step_ms, "phases_ms": phases, "epoch_s": epoch_s, "epoch_steps_timed": timed,
        "steps_per_epoch": n_batches, "epoch_extrapolated": timed < n_batches, "eval_s": eval_s,
        "peak_mem_mb": max(train_peak, eval_peak), "train_peak_mem_mb": train_peak, "eval_peak_mem_mb": eval_peak,
        "mem_before_mb": base, "mem_kind": "cuda_allocated" if device.type == "cuda" else "rss",
        "mem_peak_per_phase": per_phase, "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "gflop_per_epoch": sum(flops.values()) * n_batches / 1e9, "gflops": gflops, "matmul_fraction": gflops / matmul,
        "freeze_features": cfg.model.freeze_features, **graph,
    }
    if name == "msi":
        row["profile"] = profile_step(lambda: step(eager), device, args.profile_top)
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
    for layout_name, layout in (("csr", torch.sparse_csr), ("coo", torch.sparse_coo)):
        adj = normalized_adjacency(dataset.train, dataset.n_users, dataset.n_items, layout=layout).to(device)
        out[layout_name] = {
            "fused_ms": median_ms(lambda: run(adj, [fused]), device, repeats),
            "separate_ms": median_ms(lambda: run(adj, parts), device, repeats),
            "fused_forward_ms": median_ms(lambda: run(adj, [fused], backward=False), device, repeats),
        }
    return out


# ----------------------------------------------------------------------------------------------- one data set
def bench_dataset(dataset: Dataset, args: argparse.Namespace, device: torch.device, matmul: float) -> dict[str, Any]:
    """Graph products, then every model of ``args.models``, on one data set."""
    cfg = Config()
    print(dataset.summary(), flush=True)
    nnz = 2 * len(np.unique(dataset.train, axis=0))
    result = {"summary": dataset.summary(), "n_users": dataset.n_users, "n_items": dataset.n_items,
              "n_train": len(dataset.train), "n_valid": len(dataset.valid), "adj_nnz": nnz,
              "features": {m: list(f.shape) for m, f in dataset.features.items()}, "models": {}}
    products = graph_products(dataset, device, cfg.model.embedding_dim, cfg.model.n_layers, args.repeats)
    result["graph_product"] = products
    csr = products["csr"]
    print(f"  graph product fwd+bwd: fused {csr['fused_ms']:.1f} ms, three separate {csr['separate_ms']:.1f} ms "
          f"(CSR); fused COO {products['coo']['fused_ms']:.1f} ms", flush=True)
    evaluator = Evaluator(dataset, device, cfg.eval.ks, cfg.eval.batch_users)
    for model_name in args.models:
        try:
            row = bench_model(model_name, dataset, evaluator, args, device, matmul)
        except Exception as e:  # one model failing must not lose the others' figures
            result.setdefault("errors", {})[model_name] = f"{type(e).__name__}: {e}"
            print(f"  {model_name:9s} FAILED: {result['errors'][model_name]}", flush=True)
            continue
        result["models"][model_name] = row
        note = f" (from {row['epoch_steps_timed']} steps)" if row["epoch_extrapolated"] else ""
        graph = f" (eager {row['eager_step_ms']:.1f} ms)" if "eager_step_ms" in row else ""
        print(f"  {model_name:9s} step {row['step_ms']:8.1f} ms{graph} | epoch {row['epoch_s']:8.2f} s{note} | "
              f"eval {row['eval_s']:7.2f} s | peak {row['peak_mem_mb']:8.0f} MB | {row['gflops']:6.1f} GFLOP/s",
              flush=True)
        if row.get("capture_error"):
            print(f"  {model_name:9s} CUDA graph capture failed, eager figures: {row['capture_error']}", flush=True)
    if {"msi", "bm3"} <= set(result["models"]):
        result["msi_bm3_epoch_ratio"] = result["models"]["msi"]["epoch_s"] / result["models"]["bm3"]["epoch_s"]
    if args.mmrec_bm3 is not None:
        result["mmrec_bm3"] = mmrec_bm3(dataset, args, device)
        result["vs_mmrec_bm3"] = mmrec_ratios(result["models"], result["mmrec_bm3"])
        print(f"  MMRec BM3 {json.dumps(result['mmrec_bm3'])}\n  ratios {json.dumps(result['vs_mmrec_bm3'])}",
              flush=True)
    return result


def mmrec_bm3(dataset: Dataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MMRec's own BM3 step, timed by ``<args.mmrec_bm3>/time_bm3.py`` in a subprocess on the same device and threads,
    on this data set's train graph with random features of its widths; its JSON, or {"error": ...}."""
    widths = [str(f.shape[1]) for f in dataset.features.values()]
    steps = str(max(args.repeats, 3))
    script = args.mmrec_bm3 / "time_bm3.py"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    inter = dataset.path / f"{dataset.name}.inter"
    cmd = [sys.executable, str(script), str(inter), str(device), steps, *widths]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.mmrec_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"time_bm3.py ran past {args.mmrec_timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"time_bm3.py exit {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def mmrec_ratios(models: dict[str, dict], mmrec: dict[str, Any]) -> dict[str, float]:
    """Our step and epoch over MMRec BM3's (below 1: we are faster), for each of our models measured."""
    if "step_ms" not in mmrec:
        return {}
    out = {}
    for name, row in models.items():
        out[f"{name}_step"] = row["step_ms"] / mmrec["step_ms"]
        out[f"{name}_epoch"] = row["epoch_s"] / mmrec["epoch_s"]
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------- Markdown
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    """The results as Markdown: the machine, the settings, one table row per (data set, model), then per data set the
    graph-product figures and the MSI/BM3 epoch ratio, then the profiles."""
    m, s = res["machine"], res["settings"]
    mem = "CUDA" if m["gpu"] else "RSS"
    epoch = ("the trainer's loop over all steps" if s["epoch_steps"] is None
             else f"{s['epoch_steps']} steps of the trainer's loop, scaled to a full epoch (*)")
    lines = [
        "# msi benchmark", "",
        f"Machine: `{m['node']}`, {m['cpu']}, {m['cores']} cores; device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "") + f"; torch {m['torch']}, {m['threads']} threads; load average at "
        f"start {_f(m.get('load_avg', [None])[0], 2)}; {res['date']}.", "",
        f"Batch {s['batch_size']}; step = median of {s['repeats']} steps after {s['warmup']} warm-up; epoch = {epoch}; "
        f"eval = full ranking of the valid users; frozen features: {s['freeze_features']}. Dense float32 matmul "
        f"({s['matmul_size']}^3): **{_f(res['matmul_gflops'])} GFLOP/s**.", "",
        f"| data set | model | step ms | fwd / bwd / Adam ms | epoch s | eval s | peak {mem} MB train / eval | "
        "GFLOP/epoch | GFLOP/s | % of matmul |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ds, r in res["datasets"].items():
        lines += [_table_row(ds, name, row) for name, row in r["models"].items()]
        if "step_ms" in r.get("mmrec_bm3", {}):
            lines.append(_mmrec_row(ds, r["mmrec_bm3"]))
    lines += _mmrec_lines(res)
    lines += ["", "Graph product (forward + backward of the readout), ms: one N x 3d product vs three N x d:", ""]
    for ds, r in res["datasets"].items():
        csr, coo = r["graph_product"]["csr"], r["graph_product"]["coo"]
        ratio = f"; MSI / BM3 epoch {_f(r['msi_bm3_epoch_ratio'], 2)}x" if "msi_bm3_epoch_ratio" in r else ""
        lines.append(
            f"- {ds}: CSR fused {_f(csr['fused_ms'])} vs separate {_f(csr['separate_ms'])} "
            f"({_f(csr['separate_ms'] / csr['fused_ms'], 2)}x); COO fused {_f(coo['fused_ms'])} vs separate "
            f"{_f(coo['separate_ms'])}; fused COO / CSR {_f(coo['fused_ms'] / csr['fused_ms'], 2)}x; forward only "
            f"CSR {_f(csr['fused_forward_ms'])}, COO {_f(coo['fused_forward_ms'])}{ratio}")
    for ds, r in res["datasets"].items():
        if "profile" in r["models"].get("msi", {}):
            lines += ["", *_profile_table(ds, r["models"]["msi"]["profile"])]
    lines += [f"\nSkipped {ds}: {why}" for ds, why in res["skipped"].items()]
    return "\n".join(lines) + "\n"


def _table_row(ds: str, name: str, row: dict[str, Any]) -> str:
    phases = " / ".join(_f(v) for v in row["phases_ms"].values())
    star = "*" if row["epoch_extrapolated"] else ""
    step = _f(row["step_ms"]) + (f" (eager {_f(row['eager_step_ms'])})" if "eager_step_ms" in row else "")
    return (f"| {ds} | {name} | {step} | {phases} | {_f(row['epoch_s'], 2)}{star} | "
            f"{_f(row['eval_s'], 2)} | {_f(row['train_peak_mem_mb'], 0)} / {_f(row['eval_peak_mem_mb'], 0)} | "
            f"{_f(row['gflop_per_epoch'], 0)} | {_f(row['gflops'])} | {_f(100 * row['matmul_fraction'])} |")


def _mmrec_row(ds: str, mm: dict[str, Any]) -> str:
    peak = _f(mm["peak_gpu_mb"], 0) if mm.get("peak_gpu_mb") is not None else "-"
    return (f"| {ds} | MMRec BM3 | {_f(mm['step_ms'])} | - | {_f(mm['epoch_s'], 2)} | {_f(mm['full_eval_s'], 2)} | "
            f"{peak} | - | - | - |")


def _mmrec_lines(res: dict[str, Any]) -> list[str]:
    """Per data set: our step and epoch over MMRec BM3's, or why MMRec's timing is missing."""
    out = []
    for ds, r in res["datasets"].items():
        mm = r.get("mmrec_bm3")
        if mm is None:
            continue
        if "error" in mm:
            out.append(f"- {ds}: MMRec BM3 not timed: {mm['error']}")
            continue
        ratios = ", ".join(f"{k.replace('_', ' ')} {_f(v, 2)}x" for k, v in r["vs_mmrec_bm3"].items())
        out.append(f"- {ds}: ours / MMRec BM3 (below 1: faster): {ratios}")
    for ds, r in res["datasets"].items():
        out += [f"- {ds}: {name} FAILED: {why}" for name, why in r.get("errors", {}).items()]
        out += [f"- {ds}: {name}: CUDA graph capture failed ({row['capture_error']}); the figures are eager"
                for name, row in r["models"].items() if row.get("capture_error")]
    if out:
        out = ["", "MMRec's BM3 (its `time_bm3.py`, same device and threads; its step is a mean over the timed "
               "steps after 3 warm-up, its eval a full ranking of all users without metrics; peak = CUDA only):",
               "", *out]
    return out


def _profile_table(ds: str, prof: dict[str, Any]) -> list[str]:
    cuda = "device_ms" in prof
    busy = f"GPU busy {_f(prof['device_ms'])} ms, " if cuda else ""
    lines = [f"Profile of one MSI step on {ds} ({prof['time']} time; step {_f(prof['wall_ms'])} ms under the "
             f"profiler; {busy}CPU self time of all ops {_f(prof['cpu_self_ms'])} ms):", "",
             "| op | calls | self ms | % of step |" + (" CPU self ms |" if cuda else ""),
             "|---|---:|---:|---:|" + ("---:|" if cuda else "")]
    for p in prof["rows"]:
        cpu = f" {_f(p['cpu_self_ms'], 2)} |" if cuda else ""
        lines.append(f"| `{p['op']}` | {p['calls']} | {_f(p['self_ms'], 2)} | {_f(p['pct'])} |{cpu}")
    return lines


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, help="timed steps and graph products per median (default 10; 3 --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--epoch-steps", type=int, help="time this many steps and scale to an epoch (default: the whole "
                                                   "epoch; 3 with --quick); the output marks extrapolated epochs")
    p.add_argument("--eval-repeats", type=int, default=1, help="full evaluations per median (default 1)")
    p.add_argument("--eval-warmup", type=int, help="untimed evaluations first (default: 1 on CUDA, where the first "
                                                   "call pays kernel set-up; 0 on the CPU)")
    p.add_argument("--freeze-features", action="store_true", help="MSI and BM3 with frozen raw features")
    p.add_argument("--quick", action="store_true", help="few repeats, a 3-step epoch: a smoke test, not a measurement")
    p.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                   help="folder with baby/, sports/, tiktok/ (default: ../shared/data beside the repository)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/msi-bench"), help="where the generated elec set is kept")
    p.add_argument("--elec-preset", default="elec", help="generated preset used as 'elec' (tiny for smoke tests)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul that sets the reference rate")
    p.add_argument("--profile-top", type=int, default=10, help="ops listed in the profile of one MSI step")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="on CUDA, time MSI's step as a captured CUDA graph, as the trainer runs it (default on)")
    p.add_argument("--mmrec-bm3", type=Path, help="folder with MMRec's time_bm3.py (a copy of "
                                                  "../shared/reference/mmrec-bm3): time MMRec's BM3 in the same run")
    p.add_argument("--mmrec-timeout", type=float, default=900, help="seconds allowed to one time_bm3.py run")
    p.add_argument("--out-json", type=Path, default=Path("bench.json"))
    p.add_argument("--out-md", type=Path, default=Path("bench.md"))
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.epoch_steps = args.epoch_steps or (3 if args.quick else None)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    machine = machine_info(device)
    print(f"device {device}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''} | torch {machine['torch']} | "
          f"{machine['threads']} threads | {machine['cpu']}, {machine['cores']} cores | {machine['node']}", flush=True)
    matmul = matmul_gflops(device, args.matmul_size, max(3, args.repeats))
    print(f"dense float32 matmul {args.matmul_size}^3: {matmul:.1f} GFLOP/s", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    res = {"machine": machine, "settings": settings, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "matmul_gflops": matmul, "datasets": {}, "skipped": {}}
    for name in args.datasets:
        dataset = load_bench_dataset(name, args.shared_data, args.cache, args.elec_preset, args.seed)
        if dataset is None:
            res["skipped"][name] = f"no {name}.inter under {args.shared_data / name}"
            continue
        res["datasets"][name] = bench_dataset(dataset, args, device, matmul)
        del dataset
        write_outputs(res, args.out_json, args.out_md)  # after every data set: a long run keeps what it measured
    write_outputs(res, args.out_json, args.out_md)
    print(f"wrote {args.out_json} and {args.out_md}", flush=True)
    return res


def write_outputs(res: dict[str, Any], out_json: Path, out_md: Path) -> None:
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    out_md.write_text(markdown(res))


if __name__ == "__main__":
    main()

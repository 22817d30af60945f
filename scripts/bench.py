"""Speed and memory of MSI, the BM3 variant and LightGCN at Baby, Sports, TikTok and Elec scale (docs/benchmarks.md).

For every data set and model: the median training step (forward + backward + Adam on a batch of 2048 pairs, after
warm-up, through the trainer's own loop ``msi.train.run_epoch`` on one batch), one epoch (timed with the same loop),
one full evaluation of the valid users (``msi.evaluate.Evaluator``) and peak memory. Per data set also: the fused
graph product (one sparse product over N x 3d) against three N x d products, CSR against COO, and a profile of one
MSI step. An analytic count of an epoch's floating-point work, divided by the epoch time and by this machine's dense
float32 matmul rate measured in the same run, gives the efficiency figure. Results go to JSON and a Markdown table,
rewritten after each data set. The timing lives in bench_core.py, the MMRec runner in bench_mmrec.py (beside this file).

Data: ``baby`` and ``sports`` are the real graphs in ``../shared/data`` with generated random features of the real
shapes (their values do not change the cost); ``tiktok`` is the real set (image + audio); ``elec`` is the generated
preset, written once into ``--cache``.

With ``--mmrec-bm3 DIR`` (``../shared/reference/mmrec-bm3`` or a copy) MMRec's own BM3 step is timed by its
``time_bm3.py`` in a subprocess on the same device, threads and graph, with random features of the same widths, and
the ratios of our MSI and BM3 steps and epochs to it are written beside. With ``--mmrec SRC`` each of our models that
MMRec has (bpr, vbpr, lightgcn, bm3) is timed beside MMRec's own at its default point, through MMRec's data loader and
trainer (time_mmrec.py, run by ``--mmrec-python``, a Python with MMRec's dependencies), on the same data and
threads: the ratios of our step, epoch and evaluation to MMRec's are written beside.

Example (the tables of docs/benchmarks.md):
    python scripts/bench.py --datasets baby sports tiktok elec --threads 2 --epoch-steps 20
    python scripts/bench.py --device cuda --datasets baby tiktok --mmrec-bm3 ../shared/reference/mmrec-bm3
    python scripts/bench.py --datasets tiktok --models bpr vbpr --threads 1 --mmrec ../shared/reference/mmrec/src \
        --mmrec-python /tmp/mmrec-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_core import DATASETS, MODELS, bench_model, graph_products, load_bench_dataset, matmul_gflops
from bench_mmrec import MMREC_NAMES, mmrec_bm3, mmrec_model, mmrec_model_ratios, mmrec_ratios
from msi.config import load_config
from msi.data.dataset import Dataset
from msi.evaluate import Evaluator
from msi.runtime import resolve_device, seed_everything


# ----------------------------------------------------------------------------------------------- one data set
def bench_dataset(dataset: Dataset, args: argparse.Namespace, device: torch.device, matmul: float) -> dict[str, Any]:
    """Graph products, then every model of ``args.models``, on one data set."""
    cfg = load_config()  # the defaults: embedding size, layers, evaluation
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
    evaluator = Evaluator.from_config(dataset, device, cfg)
    for model_name in args.models:
        try:
            row = bench_model(model_name, dataset, evaluator, args, device, matmul)
        except Exception as e:  # one model failing must not lose the others' figures
            result.setdefault("errors", {})[model_name] = f"{type(e).__name__}: {e}"
            print(f"  {model_name:9s} FAILED: {result['errors'][model_name]}", flush=True)
            continue
        result["models"][model_name] = row
        note = f" (from {row['epoch_steps_timed']} steps)" if row["epoch_extrapolated"] else ""
        print(f"  {model_name:9s} step {row['step_ms']:8.1f} ms | epoch {row['epoch_s']:8.2f} s{note} | "
              f"eval {row['eval_s']:7.2f} s | peak {row['peak_mem_mb']:8.0f} MB | {_f(row['gflops']):>6} GFLOP/s",
              flush=True)
    if {"msi", "bm3"} <= set(result["models"]):
        result["msi_bm3_epoch_ratio"] = result["models"]["msi"]["epoch_s"] / result["models"]["bm3"]["epoch_s"]
    if args.mmrec_bm3 is not None:
        result["mmrec_bm3"] = mmrec_bm3(dataset, args, device)
        result["vs_mmrec_bm3"] = mmrec_ratios(result["models"], result["mmrec_bm3"])
        print(f"  MMRec BM3 {json.dumps(result['mmrec_bm3'])}\n  ratios {json.dumps(result['vs_mmrec_bm3'])}",
              flush=True)
    if args.mmrec is not None:
        _time_mmrec_models(result, dataset, args, device, cfg.eval.ks)
    return result


def _time_mmrec_models(
    result: dict[str, Any], dataset: Dataset, args: argparse.Namespace, device: torch.device, ks: list[int]
) -> None:
    """MMRec's own model beside each of ours that MMRec has, evaluated at our cut-offs ``ks``: result["mmrec"][name]
    and result["vs_mmrec"][name]."""
    for name in [n for n in result["models"] if n in MMREC_NAMES]:
        mm = result.setdefault("mmrec", {})[name] = mmrec_model(name, dataset, args, device, ks)
        ratios = result.setdefault("vs_mmrec", {})[name] = mmrec_model_ratios(result["models"][name], mm)
        print(f"  MMRec {MMREC_NAMES[name]} {json.dumps(mm)}\n  ours / MMRec {json.dumps(ratios)}", flush=True)


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
        lines += [_mmrec_model_row(ds, name, mm) for name, mm in r.get("mmrec", {}).items() if "step_ms" in mm]
    lines += _mmrec_lines(res) + _mmrec_model_lines(res)
    failed = [f"- {ds}: {name} FAILED: {why}" for ds, r in res["datasets"].items()
              for name, why in r.get("errors", {}).items()]
    lines += ["", *failed] if failed else []
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
    return (f"| {ds} | {name} | {_f(row['step_ms'])} | {phases} | {_f(row['epoch_s'], 2)}{star} | "
            f"{_f(row['eval_s'], 2)} | {_f(row['train_peak_mem_mb'], 0)} / {_f(row['eval_peak_mem_mb'], 0)} | "
            f"{_f(row['gflop_per_epoch'], 0)} | {_f(row['gflops'])} | {_f(None if row['matmul_fraction'] is None else 100 * row['matmul_fraction'])} |")


def _mmrec_row(ds: str, mm: dict[str, Any]) -> str:
    peak = _f(mm["peak_gpu_mb"], 0) if mm.get("peak_gpu_mb") is not None else "-"
    return (f"| {ds} | MMRec BM3 | {_f(mm['step_ms'])} | - | {_f(mm['epoch_s'], 2)} | {_f(mm['full_eval_s'], 2)} | "
            f"{peak} | - | - | - |")


def _mmrec_model_row(ds: str, name: str, mm: dict[str, Any]) -> str:
    return (f"| {ds} | MMRec {MMREC_NAMES[name]} | {_f(mm['step_ms'])} | - | {_f(mm['epoch_s'], 2)} | "
            f"{_f(mm['eval_s'], 2)} | - | - | - | - |")


def _mmrec_model_lines(res: dict[str, Any]) -> list[str]:
    """Per data set and model: our step, epoch and evaluation over MMRec's same model's, or why it is missing."""
    out = []
    for ds, r in res["datasets"].items():
        for name, mm in r.get("mmrec", {}).items():
            if "error" in mm:
                out.append(f"- {ds}: MMRec {MMREC_NAMES[name]} not timed: {mm['error']}")
                continue
            ratios = ", ".join(f"{k} {_f(v, 2)}x" for k, v in r["vs_mmrec"][name].items())
            out.append(f"- {ds}: ours / MMRec {MMREC_NAMES[name]} (below 1: faster): {ratios}")
    if out:
        out = ["", "MMRec's own models (time_mmrec.py: its data loader, model and trainer at its default point, same "
               "device and threads; step: median of its loader's batches, epoch: its trainer's _train_epoch with "
               "its negative sampling, eval: its trainer's evaluate of the valid users with its metrics):", "", *out]
    return out


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
    p.add_argument("--mmrec-bm3", type=Path, help="folder with MMRec's time_bm3.py (../shared/reference/"
                                                  "mmrec-bm3 or a copy): time MMRec's BM3 in the same run")
    p.add_argument("--mmrec", type=Path, help="MMRec's src/ folder (../shared/reference/mmrec/src): time MMRec's "
                                               "own model beside each of ours it has, in the same run")
    p.add_argument("--mmrec-python", type=Path, default=Path(sys.executable),
                   help="the Python that runs time_mmrec.py, with MMRec's dependencies (default: this one)")
    p.add_argument("--mmrec-timeout", type=float, default=900, help="seconds allowed to one MMRec timing run")
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

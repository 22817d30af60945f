"""Smoke test of scripts/bench.py (and its bench_core.py, bench_mmrec.py) on tiny generated data: what it writes,
the configs it runs and its FLOP count. No timing is checked."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msi.data.graph import normalized_adjacency
from msi.errors import ConfigError
from msi.data.synth import generate
from msi.models import BPR, MSI, VBPR, LightGCN
from tests.conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
MODEL_KEYS = {"step_ms", "phases_ms", "epoch_s", "epoch_extrapolated", "eval_s", "peak_mem_mb", "train_peak_mem_mb",
              "eval_peak_mem_mb", "gflop_per_step", "gflop_per_epoch", "gflops", "matmul_fraction"}


@pytest.fixture(scope="module")
def scripts_on_path():
    """scripts/ first on sys.path, as ``python scripts/bench.py`` has it: bench.py imports its sibling modules."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH.parent))
        yield


@pytest.fixture(scope="module")
def bench(scripts_on_path):
    return load_script("bench")


@pytest.fixture(scope="module")
def core(scripts_on_path):
    return importlib.import_module("bench_core")


@pytest.fixture(scope="module")
def mmrec(scripts_on_path):
    return importlib.import_module("bench_mmrec")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for ../shared/data: tiny generated ``baby`` and ``tiktok`` folders, no ``sports``."""
    root = tmp_path_factory.mktemp("shared")
    generate("tiny", root / "tiktok", seed=0, name="tiktok", progress=False)
    (root / "tiktok" / "text_feat.npy").rename(root / "tiktok" / "audio_feat.npy")
    generate("tiny", root / "baby", seed=1, name="baby", progress=False)  # only baby.inter is read
    return root


@pytest.fixture
def keep_threads():
    """main() sets torch's thread count for the whole process: put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


FAKE_TIME_BM3 = """import json, sys
assert sys.argv[2] == "cpu" and sys.argv[1].endswith(".inter")
print("a log line")
print(json.dumps({"impl": "MMRec BM3", "step_ms": 2.0, "steps_per_epoch": 1, "epoch_s": 0.002,
                  "full_eval_s": 0.5, "peak_gpu_mb": None, "argv": sys.argv[3:]}))
"""


@pytest.fixture
def fake_mmrec(tmp_path: Path) -> Path:
    """A stand-in for the mmrec-bm3 folder whose time_bm3.py checks its arguments and prints fixed JSON."""
    (tmp_path / "mmrec").mkdir()
    (tmp_path / "mmrec" / "time_bm3.py").write_text(FAKE_TIME_BM3)
    return tmp_path / "mmrec"


def test_main_writes_json_and_markdown(bench, shared: Path, tmp_path: Path, keep_threads, fake_mmrec) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    res = bench.main([
        "--datasets", "baby", "sports", "tiktok", "elec", "--quick", "--device", "cpu", "--threads", "1",
        "--repeats", "1", "--warmup", "0", "--epoch-steps", "1", "--matmul-size", "64",
        "--shared-data", str(shared), "--cache", str(tmp_path / "cache"), "--elec-preset", "tiny",
        "--out-json", str(out_json), "--out-md", str(out_md), "--mmrec-bm3", str(fake_mmrec),
    ])
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(res))
    assert {"machine", "settings", "matmul_gflops", "datasets", "skipped"} <= set(res)
    assert res["machine"]["threads"] == 1 and res["machine"]["device"] == "cpu"
    assert list(res["datasets"]) == ["baby", "tiktok", "elec"] and list(res["skipped"]) == ["sports"]
    assert (tmp_path / "cache" / "tiny" / "tiny.inter").is_file()
    for r in res["datasets"].values():
        assert set(r["models"]) == set(core_models())
        assert {"fused_ms", "separate_ms", "fused_forward_ms"} <= set(r["graph_product"]["csr"])
        assert set(r["graph_product"]["coo"]) == set(r["graph_product"]["csr"])
        assert r["msi_bm3_epoch_ratio"] > 0
        for row in r["models"].values():
            assert MODEL_KEYS <= set(row) and row["epoch_extrapolated"] is False  # tiny: one step is the epoch
            assert not {"cuda_graph", "capture_error", "eager_step_ms"} & set(row)  # one (eager) step, no second mode
        assert r["models"]["msi"]["profile"]["rows"]
    assert res["datasets"]["baby"]["features"] == {"image": [40, 4096], "text": [40, 384]}
    mm = res["datasets"]["baby"]["mmrec_bm3"]
    assert mm["step_ms"] == 2.0 and mm["argv"] == ["3", "4096", "384"]  # steps = max(repeats, 3), feature widths
    ratios = res["datasets"]["baby"]["vs_mmrec_bm3"]
    assert ratios["msi_step"] == res["datasets"]["baby"]["models"]["msi"]["step_ms"] / 2.0
    assert set(ratios) == {f"{m}_{k}" for m in core_models() for k in ("step", "epoch")}
    md = out_md.read_text()
    assert "| data set | model | step ms |" in md and md.count("| tiktok | ") == len(core_models()) + 1
    assert "Profile of one MSI step" in md
    assert "Skipped sports" in md
    assert md.count("| MMRec BM3 | 2.0 |") == 3 and "- tiktok: ours / MMRec BM3 (below 1: faster): msi step" in md


def core_models() -> list[str]:
    return list(importlib.import_module("bench_core").MODELS)


MMREC_SRC = Path(os.environ.get("MSI_MMREC_SRC", BENCH.parents[2] / "shared" / "reference" / "mmrec" / "src"))
MMREC_PYTHON = Path(os.environ.get("MSI_MMREC_PYTHON", "/tmp/mmrec-venv/bin/python"))  # with pandas


@pytest.mark.skipif(not (MMREC_SRC / "models" / "vbpr.py").is_file() or not MMREC_PYTHON.is_file(),
                    reason="MMRec's src/ (MSI_MMREC_SRC) or a Python with its dependencies (MSI_MMREC_PYTHON) absent")
def test_mmrec_models_are_timed_beside_ours(bench, shared: Path, tmp_path: Path, keep_threads) -> None:
    """MMRec's own BPR and VBPR, through its loader and trainer, beside ours on the tiny stand-in for TikTok."""
    res = bench.main([
        "--datasets", "tiktok", "--models", "bpr", "vbpr", "--quick", "--device", "cpu", "--threads", "1",
        "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--shared-data", str(shared),
        "--mmrec", str(MMREC_SRC), "--mmrec-python", str(MMREC_PYTHON),
        "--out-json", str(tmp_path / "b.json"), "--out-md", str(tmp_path / "b.md"),
    ])
    r = res["datasets"]["tiktok"]
    for name, impl in (("bpr", "MMRec BPR"), ("vbpr", "MMRec VBPR")):
        mm = r["mmrec"][name]
        assert mm["impl"] == impl and mm["threads"] == 1 and mm["steps_timed"] == 3 and mm["steps_per_epoch"] == 1
        assert r["vs_mmrec"][name]["step"] == r["models"][name]["step_ms"] / mm["step_ms"]
        assert set(r["vs_mmrec"][name]) == {"step", "epoch", "eval"}
    md = (tmp_path / "b.md").read_text()
    assert "| tiktok | MMRec VBPR |" in md and "- tiktok: ours / MMRec VBPR (below 1: faster): step" in md


def test_an_mmrec_model_that_fails_is_recorded_not_raised(bench, mmrec, tiny, tmp_path: Path) -> None:
    args = bench.parse_args(["--mmrec", str(tmp_path), "--repeats", "1"])  # no MMRec there: its imports fail
    out = mmrec.mmrec_model("vbpr", tiny, args, torch.device("cpu"), [10, 20])
    assert "time_mmrec.py VBPR exit 1" in out["error"] and "No module named" in out["error"]
    assert mmrec.mmrec_model_ratios({}, out) == {}


def test_mmrec_failure_is_recorded_not_raised(bench, mmrec, tiny, tmp_path: Path) -> None:
    (tmp_path / "time_bm3.py").write_text("import sys; sys.exit('no scipy here')")
    args = bench.parse_args(["--mmrec-bm3", str(tmp_path), "--repeats", "1"])
    out = mmrec.mmrec_bm3(tiny, args, torch.device("cpu"))
    assert "no scipy here" in out["error"] and mmrec.mmrec_ratios({}, out) == {}


def test_model_configs_go_through_load_config(core) -> None:
    bm3 = core.model_config("bm3", freeze=True, batch_size=512)
    m = bm3.model
    assert (m.name, m.use_ssd, m.use_ip, m.freeze_features) == ("msi", False, False, True)
    assert (bm3.loss.w_align, bm3.loss.w_mask, bm3.train.batch_size) == (2.0, 2.0, 512)
    lightgcn = core.model_config("lightgcn", freeze=True, batch_size=2048)
    assert lightgcn.model.name == "lightgcn" and not hasattr(lightgcn.model, "freeze_features")  # no raw features
    with pytest.raises(ConfigError, match="train.batch_size"):  # validated like every other caller's config
        core.model_config("msi", freeze=False, batch_size=0)


def test_step_flops_by_hand(core) -> None:
    train = np.array([[0, 0], [0, 1], [1, 1], [2, 0]])  # 4 edges -> nnz 8
    adj = normalized_adjacency(train, 3, 2)
    feats = {"image": torch.zeros(2, 10), "text": torch.zeros(2, 6)}
    msi = MSI(3, 2, adj, feats, embedding_dim=4)
    got = core.step_flops(msi, batch=5, n_unique=2)
    # sparse: 4 * nnz * 3 graphs * d * L; projections: 3 * 2 * I * F * d; heads: 3 * 2 modalities * 2 I d (2d);
    # InfoNCE: 3 * 2 n^2 d; predictor: 3 * 2 * (2 + 2) B d^2
    assert got == {"sparse": 4 * 8 * 3 * 4, "projection": 3 * 2 * 2 * 16 * 4, "ssd_heads": 3 * 2 * 2 * 2 * 4 * 8,
                   "info_nce": 3 * 2 * 4 * 4, "predictor": 3 * 2 * 4 * 5 * 16}
    frozen = MSI(3, 2, adj, feats, embedding_dim=4, use_ssd=False, use_ip=False, freeze_features=True)
    assert core.step_flops(frozen, batch=5, n_unique=2) == {"sparse": 4 * 8 * 4, "projection": 2 * 2 * 2 * 16 * 4,
                                                            "predictor": 3 * 2 * 4 * 5 * 16}
    assert core.step_flops(LightGCN(3, 2, adj, train, embedding_dim=4), 5, 2) == {"sparse": 4 * 8 * 4}
    # VBPR: E (F = 16 -> d' = 3) over 2B rows, forward and the weight's gradient; BPR-MF: no product of matrices
    assert core.step_flops(VBPR(3, 2, train, feats, embedding_dim=4, feature_dim=3), 5, 2) == {
        "projection": 2 * 2 * 10 * 16 * 3}
    assert core.step_flops(BPR(3, 2, train, embedding_dim=4), 5, 2) == {}


def test_help_runs_without_measuring(tmp_path: Path) -> None:
    src = str(BENCH.parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True, env=env,
                         cwd=tmp_path).stdout  # this checkout's msi; its sibling modules found from any folder
    assert "--epoch-steps" in out and "--freeze-features" in out and "--mmrec-bm3" in out and "--mmrec-python" in out
    assert "--cuda-graph" not in out

"""The same code on CUDA: model losses, gradients and evaluation agree with the CPU; training runs end to end.

Skipped where torch sees no CUDA GPU (CI); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from msi.config import load_config
from msi.evaluate import Evaluator
from msi.models import MSI, LightGCN
from msi.data.graph import normalized_adjacency

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _msi(tiny, **kw) -> MSI:
    torch.manual_seed(0)
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    return MSI(tiny.n_users, tiny.n_items, adj, feats, dropout=0.0, **kw)


@pytest.mark.parametrize("kw", [{}, {"use_ssd": False}, {"use_ip": False}, {"use_ssd": False, "use_ip": False}])
def test_msi_loss_and_grads_match_cpu(tiny, kw):
    cpu = _msi(tiny, **kw).eval()  # eval: SSD uses the means, dropout 0: the loss is deterministic
    gpu = _msi(tiny, **kw).eval().to("cuda")  # the same seed: the same initial parameters
    pairs = torch.from_numpy(tiny.train[:64])
    lc = cpu.loss(pairs[:, 0], pairs[:, 1])
    lg = gpu.loss(pairs[:, 0].cuda(), pairs[:, 1].cuda())
    for k in lc:
        assert torch.allclose(lc[k], lg[k].cpu(), rtol=1e-4, atol=1e-5), k
    lc["loss"].backward()
    lg["loss"].backward()
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if pc.grad is not None:
            assert torch.allclose(pc.grad, pg.grad.cpu(), rtol=1e-3, atol=1e-5), name


def test_evaluation_matches_cpu(tiny):
    cpu = _msi(tiny).eval()
    gpu = _msi(tiny).eval().to("cuda")
    for view in cpu.item_views:
        mc = Evaluator(tiny, "cpu")(cpu, "valid", view)
        mg = Evaluator(tiny, "cuda")(gpu, "valid", view)
        assert mc == pytest.approx(mg, abs=1e-6)


def test_lightgcn_negatives_on_cuda(tiny):
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    model = LightGCN(tiny.n_users, tiny.n_items, adj, tiny.train).to("cuda")
    users = torch.from_numpy(tiny.train[:, 0]).cuda()
    neg = model.sample_negatives(users)
    seen = set(map(tuple, tiny.train.tolist()))
    assert not any((u, i) in seen for u, i in zip(users.tolist(), neg.tolist()))
    assert torch.isfinite(model.loss(users, torch.from_numpy(tiny.train[:, 1]).cuda())["loss"])


@pytest.mark.parametrize("extra", [[], ["train.autocast=bf16"], ["model.name=lightgcn"]])
def test_train_end_to_end_on_cuda(tmp_path, extra):
    from msi.train import train

    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=tiny", "data.synth_preset=tiny",
                             "train.epochs=3", "train.patience=5", "train.device=cuda", *extra])
    results = train(cfg, out=tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] == results["test"] and 0.0 <= results["test"]["recall@20"] <= 1.0

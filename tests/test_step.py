"""msi.step and the static-shape pieces it captures: fixed-size InfoNCE/AKL against the torch.unique versions, the
edge-list graph product against CSR, the static-shape MSI and fused Adam against the eager reference (losses,
gradients, a 3-epoch trajectory), and the snapshot that undoes a capture's warm-up. CPU only; the captured CUDA
step itself is checked in tests/test_cuda.py."""

from __future__ import annotations

import copy

import pytest
import torch

from msi.data.graph import normalized_adjacency
from msi.losses import (average_kl, first_occurrence, info_nce, masked_average_kl, masked_info_nce)
from msi.models import MSI
from msi.models.base import EdgeList, lightgcn_readout
from msi.step import TrainStep, _restore, _snapshot
from msi.train import run_epoch, make_optimizer


def _msi(tiny, **kw) -> MSI:
    torch.manual_seed(0)
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    return MSI(tiny.n_users, tiny.n_items, adj, feats, **kw)


def test_first_occurrence_marks_one_of_each_value() -> None:
    ids = torch.tensor([5, 3, 5, 1, 3, 5])
    assert first_occurrence(ids).tolist() == [True, True, False, True, False, False]


def test_masked_info_nce_and_kl_equal_the_unique_versions() -> None:
    g = torch.Generator().manual_seed(0)
    items = torch.randint(0, 12, (32,), generator=g)
    rows = {k: torch.randn(12, 8, generator=g) for k in ("a", "b", "mu1", "mu2")}
    sd1, sd2 = torch.rand(12, 8, generator=g) + 0.1, torch.rand(12, 8, generator=g) + 0.1
    uniq, keep = torch.unique(items), first_occurrence(items)
    want = info_nce(rows["a"][uniq], rows["b"][uniq], 0.2)
    got = masked_info_nce(rows["a"][items], rows["b"][items], 0.2, keep)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want_kl = average_kl(rows["mu1"][uniq], sd1[uniq], rows["mu2"][uniq], sd2[uniq])
    got_kl = masked_average_kl(rows["mu1"][items], sd1[items], rows["mu2"][items], sd2[items], keep)
    torch.testing.assert_close(got_kl, want_kl, rtol=1e-6, atol=1e-6)


def test_masked_info_nce_gradient_equals_the_unique_version() -> None:
    items = torch.tensor([0, 2, 2, 1, 0, 3])
    a, b = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    uniq = torch.unique(items)
    ga = torch.autograd.grad(info_nce(a[uniq], b[uniq], 0.5), (a, b))
    gm = torch.autograd.grad(masked_info_nce(a[items], b[items], 0.5, first_occurrence(items)), (a, b))
    for x, y in zip(gm, ga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_edge_product_equals_csr_forward_and_backward(tiny) -> None:
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    x = torch.randn(adj.shape[0], 6, requires_grad=True)
    grad = torch.randn(adj.shape[0], 6)
    y_csr = lightgcn_readout(adj, x, 2)
    (g_csr,) = torch.autograd.grad(y_csr, x, grad)
    y_edge = lightgcn_readout(EdgeList.from_sparse(adj), x, 2)
    (g_edge,) = torch.autograd.grad(y_edge, x, grad)
    torch.testing.assert_close(y_edge, y_csr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_edge, g_csr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"code_placement": "mean"}, {"use_ip": False}, {"use_ssd": False}])
def test_static_shapes_give_the_eager_loss_and_gradients(tiny, kw) -> None:
    eager, static = _msi(tiny, **kw), _msi(tiny, **kw)
    static.static_shapes(True)
    pairs = torch.from_numpy(tiny.train[:48])
    out = []
    for model in (eager, static):
        torch.manual_seed(1)  # the same samples and dropout masks: both draw in the same order
        terms = model.loss(pairs[:, 0], pairs[:, 1])
        terms["loss"].backward()
        out.append((terms, {n: p.grad for n, p in model.named_parameters()}))
    (te, ge), (ts, gs) = out
    assert te.keys() == ts.keys()
    for k in te:
        torch.testing.assert_close(ts[k], te[k], rtol=1e-5, atol=1e-6, msg=k)
    for n in ge:
        torch.testing.assert_close(gs[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)


def _trajectory(tiny, epochs: int, static: bool = False, foreach: bool = False) -> tuple[list[float], MSI]:
    model = _msi(tiny)
    model.static_shapes(static)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True) if foreach else make_optimizer(model, 1e-3)
    pairs = torch.from_numpy(tiny.train)
    torch.manual_seed(2)
    losses = [run_epoch(model, opt, pairs, 64, e, quiet=True)["loss"] for e in range(epochs)]
    return losses, model


def test_fused_adam_and_static_shapes_follow_the_reference_trajectory(tiny) -> None:
    """3 epochs (batch 64, partial last batch) of the reference (foreach Adam, eager, torch.unique) against fused
    Adam, and against fused Adam with static shapes."""
    ref_losses, ref = _trajectory(tiny, 3, foreach=True)
    for static in (False, True):
        losses, model = _trajectory(tiny, 3, static=static)
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_eager_step_is_the_reference_step_bit_for_bit(tiny) -> None:
    a, b = _msi(tiny), _msi(tiny)
    opt_a, opt_b = make_optimizer(a, 1e-3), make_optimizer(b, 1e-3)
    step = TrainStep(a, opt_a, cuda_graph=True)  # ignored on the CPU
    assert not step.cuda_graph
    batch = torch.from_numpy(tiny.train[:50])
    for _ in range(3):
        torch.manual_seed(3)
        got = step(batch)
        torch.manual_seed(3)
        want = b.loss(batch[:, 0], batch[:, 1])
        opt_b.zero_grad(set_to_none=True)
        want["loss"].backward()
        opt_b.step()
        assert all(torch.equal(got[k], want[k].detach()) for k in want)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_snapshot_restore_undoes_steps_in_place(tiny) -> None:
    model = _msi(tiny)
    opt = make_optimizer(model, 1e-3)
    step = TrainStep(model, opt)
    batch = torch.from_numpy(tiny.train[:50])
    step(batch)  # Adam state exists
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    addresses = [p.data_ptr() for p in model.parameters()]
    saved = _snapshot(model, opt)
    for _ in range(2):
        step(batch)
    _restore(model, opt, saved)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))
    state = opt.state_dict()["state"]
    for k, s in before[1]["state"].items():
        assert all(torch.equal(v, state[k][n]) for n, v in s.items())


# 3 epochs of the implementation before msi.step (commit cbffa67: foreach Adam, torch.unique, cross-entropy InfoNCE,
# sliced readout) on the tiny set, batch 64, seeds as in _pinned_run: the mean loss terms of each epoch and the sum
# of |parameter| at the end
REFERENCE_LOSSES = [
    {"rec": 2.0199623107910156, "align": 1.9233652353286743, "mask": 1.9793235063552856, "reg": 4.963735580444336, "nce": -0.05725213885307312, "akl": 134.96400451660156, "ssd": 0.07074853777885437, "loss": 6.4260993003845215},
    {"rec": 1.9827864170074463, "align": 1.883667230606079, "mask": 1.7685073614120483, "reg": 4.778984069824219, "nce": 0.23735308647155762, "akl": 115.01610565185547, "ssd": -0.22585147619247437, "loss": 6.090274333953857},
    {"rec": 1.9584935903549194, "align": 1.8102554082870483, "mask": 1.5964666604995728, "reg": 4.733516216278076, "nce": 0.4866458773612976, "akl": 112.60588836669922, "ssd": -0.47538530826568604, "loss": 5.79102897644043},
]
REFERENCE_PARAM_SUMS = {"user_emb": 417.71741060580825, "item_emb": 303.44122039937065, "raw.image": 1839.2966363789747, "raw.text": 800.9676500039641, "proj.image.weight": 228.99928028075374, "proj.image.bias": 5.356109875719994, "proj.text.weight": 124.74714144686732, "proj.text.bias": 6.507010439701844, "head.image.weight": 350.1793953176948, "head.image.bias": 1.6881903243775014, "head.text.weight": 359.2424813739817, "head.text.bias": 1.7008067358401604, "predictor.weight": 410.28212246563635, "predictor.bias": 4.317398977000266}


def _pinned_run(tiny, static: bool) -> tuple[list[dict], dict[str, float]]:
    model = _msi(tiny)
    model.static_shapes(static)
    opt = make_optimizer(model, 1e-3)
    torch.manual_seed(2)
    rows = [run_epoch(model, opt, torch.from_numpy(tiny.train), 64, e, quiet=True) for e in range(3)]
    return rows, {k: float(v.double().abs().sum()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("static", [False, True])
def test_trajectory_matches_the_implementation_before_this_module(tiny, static) -> None:
    rows, sums = _pinned_run(tiny, static)
    for row, want in zip(rows, REFERENCE_LOSSES):
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sums == pytest.approx(REFERENCE_PARAM_SUMS, rel=1e-5)

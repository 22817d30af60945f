"""msi.train.run_epoch and make_optimizer: the epoch loop against a 3-epoch trajectory pinned before the speed
work (foreach Adam, torch.unique, cross-entropy InfoNCE, sliced readout), and fused Adam against foreach Adam."""

from __future__ import annotations

import pytest
import torch

from msi.data.graph import normalized_adjacency
from msi.models import MSI
from msi.train import make_optimizer, run_epoch


def _msi(tiny, **kw) -> MSI:
    torch.manual_seed(0)
    adj = normalized_adjacency(tiny.train, tiny.n_users, tiny.n_items)
    feats = {m: torch.from_numpy(f) for m, f in tiny.features.items()}
    return MSI(tiny.n_users, tiny.n_items, adj, feats, **kw)


def _trajectory(tiny, epochs: int, foreach: bool = False) -> tuple[list[dict], MSI]:
    model = _msi(tiny)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True) if foreach else make_optimizer(model, 1e-3)
    torch.manual_seed(2)
    rows = [run_epoch(model, opt, torch.from_numpy(tiny.train), 64, e, quiet=True) for e in range(epochs)]
    return rows, model


def test_fused_adam_follows_the_foreach_trajectory(tiny) -> None:
    """3 epochs (batch 64, partial last batch): make_optimizer's fused Adam against the per-tensor reference."""
    ref_rows, ref = _trajectory(tiny, 3, foreach=True)
    rows, model = _trajectory(tiny, 3)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_an_epoch_is_zero_grad_loss_backward_step_per_batch(tiny) -> None:
    """One epoch of one full batch equals the step written out by hand, bit for bit; the last step's gradients
    stay for the diagnostics."""
    a, b = _msi(tiny), _msi(tiny)
    opt_a, opt_b = make_optimizer(a, 1e-3), make_optimizer(b, 1e-3)
    pairs = torch.from_numpy(tiny.train[:50])
    torch.manual_seed(3)
    row = run_epoch(a, opt_a, pairs, 64, 0)
    torch.manual_seed(3)
    batch = pairs[torch.randperm(len(pairs))]
    want = b.loss(batch[:, 0], batch[:, 1])
    want["loss"].backward()
    opt_b.step()
    assert {k: row[k] for k in want} == {k: float(v.detach()) for k, v in want.items()}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.grad is not None for p in a.parameters() if p.requires_grad)


# 3 epochs of the implementation before the speed work (commit cbffa67: foreach Adam, torch.unique, cross-entropy
# InfoNCE, sliced readout) on the tiny set, batch 64, seeds as in _pinned_run: the mean loss terms of each epoch and
# the sum of |parameter| at the end
REFERENCE_LOSSES = [
    {"rec": 2.0199623107910156, "align": 1.9233652353286743, "mask": 1.9793235063552856, "reg": 4.963735580444336, "nce": -0.05725213885307312, "akl": 134.96400451660156, "ssd": 0.07074853777885437, "loss": 6.4260993003845215},
    {"rec": 1.9827864170074463, "align": 1.883667230606079, "mask": 1.7685073614120483, "reg": 4.778984069824219, "nce": 0.23735308647155762, "akl": 115.01610565185547, "ssd": -0.22585147619247437, "loss": 6.090274333953857},
    {"rec": 1.9584935903549194, "align": 1.8102554082870483, "mask": 1.5964666604995728, "reg": 4.733516216278076, "nce": 0.4866458773612976, "akl": 112.60588836669922, "ssd": -0.47538530826568604, "loss": 5.79102897644043},
]
REFERENCE_PARAM_SUMS = {"user_emb": 417.71741060580825, "item_emb": 303.44122039937065, "raw.image": 1839.2966363789747, "raw.text": 800.9676500039641, "proj.image.weight": 228.99928028075374, "proj.image.bias": 5.356109875719994, "proj.text.weight": 124.74714144686732, "proj.text.bias": 6.507010439701844, "head.image.weight": 350.1793953176948, "head.image.bias": 1.6881903243775014, "head.text.weight": 359.2424813739817, "head.text.bias": 1.7008067358401604, "predictor.weight": 410.28212246563635, "predictor.bias": 4.317398977000266}


def test_trajectory_matches_the_pinned_implementation(tiny) -> None:
    model = _msi(tiny)
    opt = make_optimizer(model, 1e-3)
    torch.manual_seed(2)
    rows = [run_epoch(model, opt, torch.from_numpy(tiny.train), 64, e, quiet=True) for e in range(3)]
    sums = {k: float(v.double().abs().sum()) for k, v in model.state_dict().items()}
    for row, want in zip(rows, REFERENCE_LOSSES):
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sums == pytest.approx(REFERENCE_PARAM_SUMS, rel=1e-5)

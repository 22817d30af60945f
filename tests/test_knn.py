"""msi.models.knn: the kNN item graph of four 2-d items by hand, chunking, gradients, and the D^-1/2 S D^-1/2 rule."""

from __future__ import annotations

import math

import pytest
import torch

from msi.models.knn import cosine_knn, knn_edges, sym_normalize, to_csr

# Four items whose 2-nearest neighbours (by cosine) have no ties:
#   cos:      0        1        2        3
#   0  [     1,       0,   2/√5,   3/√10]  -> {0, 3}
#   1  [     0,       1,   1/√5,  -1/√10]  -> {1, 2}
#   2  [  2/√5,    1/√5,      1,    1/√2]  -> {2, 0}
#   3  [ 3/√10,  -1/√10,   1/√2,       1]  -> {3, 0}
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [3.0, -1.0]])
NEIGHBOURS = [[0, 3], [1, 2], [2, 0], [3, 0]]
SIMS = [[1, 3 / math.sqrt(10)], [1, 1 / math.sqrt(5)], [1, 2 / math.sqrt(5)], [1, 3 / math.sqrt(10)]]


def test_cosine_knn_by_hand() -> None:
    idx, sim = cosine_knn(X, 2)
    assert idx.tolist() == NEIGHBOURS
    torch.testing.assert_close(sim, torch.tensor(SIMS))


def test_chunks_do_not_change_the_neighbours_and_k_is_capped() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 7)
    idx, sim = cosine_knn(x, 5)
    idx3, sim3 = cosine_knn(x, 5, chunk=3)
    assert torch.equal(idx, idx3) and torch.equal(sim, sim3)
    assert cosine_knn(X, 10)[0].shape == (4, 4)


def test_weighted_graph_normalized_by_its_row_sums_by_hand() -> None:
    """LATTICE's S~: the kNN cosines, then D^-1/2 S D^-1/2 with d the row sums (1 + the neighbour's cosine)."""
    idx, sim = cosine_knn(X, 2)
    rows, cols = knn_edges(idx)
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and cols.tolist() == sum(NEIGHBOURS, [])
    vals = sym_normalize(rows, cols, sim.flatten(), 4)
    d = [1 + 3 / math.sqrt(10), 1 + 1 / math.sqrt(5), 1 + 2 / math.sqrt(5), 1 + 3 / math.sqrt(10)]
    want = torch.zeros(4, 4)
    for i, (nbrs, sims) in enumerate(zip(NEIGHBOURS, SIMS)):
        for j, s in zip(nbrs, sims):
            want[i, j] = s / math.sqrt(d[i] * d[j])
    torch.testing.assert_close(to_csr(rows, cols, vals, 4).to_dense(), want)
    assert want[0, 3] == pytest.approx(0.4868329805)  # (3/√10) / (1 + 3/√10)
    assert want[1, 2] == pytest.approx(0.2700907567)


def test_binary_graph_has_every_entry_one_over_k_and_a_zero_row_gives_zero() -> None:
    rows, cols = knn_edges(cosine_knn(X, 2)[0])
    torch.testing.assert_close(sym_normalize(rows, cols, torch.ones(8), 4), torch.full((8,), 0.5))
    vals = sym_normalize(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), 3)
    assert torch.isfinite(vals).all()  # rows 1 and 2 have sum 0: their d^-1/2 is 0, never inf
    assert cosine_knn(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 2)[1].isfinite().all()


def test_duplicate_edges_add_up() -> None:
    dense = to_csr(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([0.25, 0.5, 2.0]), 2).to_dense()
    torch.testing.assert_close(dense, torch.tensor([[0.0, 0.75], [2.0, 0.0]]))


def test_gradient_equals_topk_of_the_dense_similarity() -> None:
    torch.manual_seed(1)
    x = torch.randn(12, 5, requires_grad=True)
    w = torch.randn(12, 3)
    (cosine_knn(x, 3, chunk=5)[1] * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    xn = x / x.norm(dim=1, keepdim=True)
    (torch.topk(xn @ xn.T, 3, dim=1).values * w).sum().backward()
    torch.testing.assert_close(ours, x.grad)

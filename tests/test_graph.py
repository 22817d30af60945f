"""msi.data.graph: the normalized bipartite adjacency and the mean-aggregation graph (exact numbers), and the
interaction mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msi.data.graph import interaction_csr, mean_adjacency, normalized_adjacency

# 3 users, 2 items; user 2 has no train row. (0, 0) appears twice and must count once.
# Degrees: u0 = 2, u1 = 1, u2 = 0, i0 = 2, i1 = 1. Nodes: u0, u1, u2, i0 = 3, i1 = 4.
TRAIN = np.array([[0, 0], [0, 1], [1, 0], [0, 0]])
R2 = 1 / math.sqrt(2)
EXPECTED = torch.tensor([
    #  u0   u1   u2   i0   i1
    [0.0, 0.0, 0.0, 0.5, R2],  # u0: 1/sqrt(2*2), 1/sqrt(2*1)
    [0.0, 0.0, 0.0, R2, 0.0],  # u1: 1/sqrt(1*2)
    [0.0, 0.0, 0.0, 0.0, 0.0],  # u2: isolated, a zero row
    [0.5, R2, 0.0, 0.0, 0.0],  # i0
    [R2, 0.0, 0.0, 0.0, 0.0],  # i1
])


def test_exact_values_on_a_three_user_two_item_graph():
    adj = normalized_adjacency(TRAIN, 3, 2)
    assert adj.layout == torch.sparse_csr and adj.dtype == torch.float32 and adj.shape == (5, 5)
    dense = adj.to_dense()
    torch.testing.assert_close(dense, EXPECTED, rtol=0, atol=1e-7)
    assert torch.isfinite(dense).all()
    assert adj.values().numel() == 6  # the duplicate (0, 0) row is one edge, stored in both directions


def test_mean_adjacency_averages_each_nodes_neighbours():
    """D^-1 A on TRAIN: row v holds 1/deg(v) at each neighbour; the isolated u2 a zero row; the second tensor is
    the transpose."""
    adj, adj_t = mean_adjacency(TRAIN, 3, 2)
    expected = torch.tensor([
        #  u0   u1   u2   i0   i1
        [0.0, 0.0, 0.0, 0.5, 0.5],  # u0: deg 2
        [0.0, 0.0, 0.0, 1.0, 0.0],  # u1: deg 1
        [0.0, 0.0, 0.0, 0.0, 0.0],  # u2: isolated
        [0.5, 0.5, 0.0, 0.0, 0.0],  # i0: deg 2
        [1.0, 0.0, 0.0, 0.0, 0.0],  # i1: deg 1
    ])
    assert adj.layout == adj_t.layout == torch.sparse_csr and adj.values().numel() == 6
    torch.testing.assert_close(adj.to_dense(), expected, rtol=0, atol=0)
    torch.testing.assert_close(adj_t.to_dense(), expected.T, rtol=0, atol=0)


def test_symmetric_without_self_loops_and_bipartite():
    csr = normalized_adjacency(TRAIN, 3, 2).to_dense()
    torch.testing.assert_close(csr, csr.T, rtol=0, atol=0)
    assert (csr.diagonal() == 0).all()
    assert (csr[:3, :3] == 0).all() and (csr[3:, 3:] == 0).all()  # bipartite: no user-user, item-item edges


def test_isolated_item_and_empty_graph_give_zero_rows_not_nan():
    adj = normalized_adjacency(np.array([[0, 0]]), 2, 3).to_dense()  # users 1 and items 1, 2 isolated
    expected = torch.zeros(5, 5)
    expected[0, 2] = expected[2, 0] = 1.0
    torch.testing.assert_close(adj, expected, rtol=0, atol=0)
    empty = normalized_adjacency(np.zeros((0, 2), dtype=np.int64), 2, 2).to_dense()
    assert (empty == 0).all()


@pytest.mark.parametrize("n_users, n_items, n_edges", [(7, 5, 12), (30, 50, 200)])
def test_matches_dense_formula_on_a_random_graph(n_users, n_items, n_edges):
    rng = np.random.default_rng(n_edges)
    train = np.stack([rng.integers(0, n_users, n_edges), rng.integers(0, n_items, n_edges)], axis=1)
    r = torch.zeros(n_users, n_items, dtype=torch.float64)
    r[train[:, 0], train[:, 1]] = 1.0
    a = torch.zeros(n_users + n_items, n_users + n_items, dtype=torch.float64)
    a[:n_users, n_users:], a[n_users:, :n_users] = r, r.T
    d = a.sum(1).pow(-0.5)
    d[torch.isinf(d)] = 0.0
    expected = (d[:, None] * a * d[None, :]).float()
    torch.testing.assert_close(normalized_adjacency(train, n_users, n_items).to_dense(), expected)


def test_interaction_csr():
    mask = interaction_csr(np.array([[0, 1], [2, 0], [0, 1], [2, 2]]), 3, 3)
    assert mask.layout == torch.sparse_csr and mask.shape == (3, 3)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(mask.to_dense(), expected, rtol=0, atol=0)  # duplicates count once
    assert mask.crow_indices().tolist() == [0, 1, 1, 3] and mask.col_indices().tolist() == [1, 0, 2]

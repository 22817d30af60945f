"""k-nearest-neighbour item-item graphs from item features, shared by FREEDOM (frozen) and LATTICE (learned).

Each item's k neighbours are the k items whose features have the largest cosine similarity with its own (itself
included, at similarity 1). A graph is an edge list: ``rows`` and ``cols`` (E,) long, ``values`` (E,) float, with
duplicate (row, col) pairs adding up. ``sym_normalize`` turns edge weights into D^-1/2 S D^-1/2 with D the row sums
(the kNN graph is directed: D counts each item's out-edges). Nothing here builds an I x I matrix at once: the
similarities are computed ``chunk`` rows at a time, so memory is O(chunk * I), and only the k chosen similarities
are recomputed with autograd, which gives the gradient torch.topk on the full matrix gives.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def cosine_knn(x: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest rows of ``x`` (I, F) by cosine similarity: (indices (I, k) long, similarities (I, k)).

    The similarities carry ``x``'s gradient; the choice of neighbours does not (it is piecewise constant). A zero
    row has similarity 0 with every row (F.normalize), where a plain division would give NaN."""
    xn = F.normalize(x, dim=-1)
    k = min(k, x.shape[0])
    with torch.no_grad():
        idx = torch.cat([torch.topk(xn[s : s + chunk] @ xn.T, k, dim=1).indices for s in range(0, len(xn), chunk)])
    sim = (xn[:, None, :] * xn[idx]).sum(-1)  # (I, k), the same numbers as the chosen entries of xn @ xn.T
    return idx, sim


def knn_edges(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each (I * k,), of the graph whose row i links i to idx[i] (I, k), row-major like idx.flatten()."""
    rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    return rows, idx.flatten()


def sym_normalize(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """D^-1/2 S D^-1/2 of the (n, n) edge list S: values (E,) * d[rows]^-1/2 * d[cols]^-1/2 with d the row sums of
    S (duplicates summed); a row of sum 0 gives 0, never inf. Differentiable in ``values``."""
    d = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    inv_sqrt = d.pow(-0.5).masked_fill(d == 0, 0.0)
    return values * inv_sqrt[rows] * inv_sqrt[cols]


def to_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, n) sparse CSR tensor of an edge list, duplicates summed (values detached: for a fixed graph)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.detach(), (n, n), check_invariants=False)
    coo = coo.coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()

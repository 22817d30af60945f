"""The normalized user-item training graph of SPEC §2, built without dense N x N intermediates."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def normalized_adjacency(train: np.ndarray, n_users: int, n_items: int, self_loops: bool = False) -> torch.Tensor:
    """Â = D^-1/2 A D^-1/2 of the bipartite graph of ``train`` rows, as an (N, N) sparse CSR float32 tensor.

    ``train`` is an int array of shape (n, 2) holding (user, item) rows; node ids are users 0..U-1 then items
    U..U+I-1. Duplicate rows count once, and isolated nodes get all-zero rows (never NaN). ``self_loops``: A + I
    in place of A (D counts the loop; LATTICE's graph), so every node has a diagonal entry 1 / (degree + 1).
    CSR is the faster layout for ``A @ X`` on CPU and CUDA, and its rows are sorted (``bipartite_blocks`` relies on
    it).
    """
    n = n_users + n_items
    pairs = np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0)
    u, i = pairs[:, 0], pairs[:, 1] + n_users
    loops = np.arange(n) if self_loops else np.empty(0, np.int64)
    deg = np.bincount(np.concatenate([u, i, loops]), minlength=n).astype(np.float64)
    inv_sqrt = np.zeros(n)
    nz = deg > 0
    inv_sqrt[nz] = deg[nz] ** -0.5
    rows = np.concatenate([u, i, loops])
    cols = np.concatenate([i, u, loops])
    vals = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    csr = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    csr.sort_indices()
    return _to_torch_csr(csr)


def mean_adjacency(train: np.ndarray, n_users: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D^-1 A, (D^-1 A)^T) of the bipartite graph of ``train`` rows, each an (N, N) sparse CSR float32 tensor.

    Row v of D^-1 A averages v's neighbours (mean aggregation: 1 / deg(v) on each of v's edges); isolated nodes
    (items seen only in valid or test) get all-zero rows. Node ids and duplicates as in ``normalized_adjacency``;
    the transpose is what the gradient of a product with D^-1 A needs (``msi.models.base.sparse_product``).
    """
    n = n_users + n_items
    pairs = np.unique(np.asarray(train, dtype=np.int64).reshape(-1, 2), axis=0)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1] + n_users])
    cols = np.concatenate([pairs[:, 1] + n_users, pairs[:, 0]])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    vals = (1.0 / deg[rows]).astype(np.float32)
    csr = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    csr.sort_indices()
    csr_t = csr.T.tocsr()
    csr_t.sort_indices()
    return _to_torch_csr(csr), _to_torch_csr(csr_t)


def interaction_csr(pairs: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """(user, item) rows of shape (n, 2) -> a (U, I) sparse CSR 0/1 matrix, used to mask seen items."""
    pairs = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    csr = sp.csr_matrix((np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
    return _to_torch_csr(csr)


def _to_torch_csr(csr: sp.csr_matrix) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense and row slicing is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data.astype(np.float32)),
            csr.shape,
            check_invariants=False,
        )

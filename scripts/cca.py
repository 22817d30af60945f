"""Canonical correlations between two item feature files of a data set: how much the two modalities share.

SSD keeps what the two modalities share; when they share little, it has little to keep. The leading canonical
correlations rho_1 >= rho_2 >= ... say how much linear signal the two feature sets have in common (1 = a direction
of one set is an exact linear function of the other; 0 = nothing shared).

    python scripts/cca.py ../shared/data/tiktok/image_feat.npy ../shared/data/tiktok/audio_feat.npy --top 8

Each set is centred and whitened with a small ridge (``--ridge`` times the mean variance) so that near-constant
directions cannot fake a correlation; the correlations are the singular values of the whitened cross-covariance.
With many feature columns per item the in-sample correlations are biased upward (noise alone correlates), so the
directions are also fitted on a random half of the items and their correlations measured on the other half
(``held_out``): that is the number to read when items are few against columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _whitener(x: np.ndarray, ridge: float) -> np.ndarray:
    """W with W^T C W = I for C = cov(x) + ridge * mean(diag C) * I; x is (n, p), centred."""
    cov = x.T @ x / (len(x) - 1)
    cov += ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    return vecs / np.sqrt(vals)


def cca_directions(a: np.ndarray, b: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlations (k,) in decreasing order, k = min(p, q), and the directions (p, k), (q, k) of the
    (n, p) and (n, q) arrays a, b (rows are items in the same order)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the feature sets have {a.shape[0]} and {b.shape[0]} rows; they must describe the same items")
    a = a.astype(np.float64) - a.mean(0)
    b = b.astype(np.float64) - b.mean(0)
    wa, wb = _whitener(a, ridge), _whitener(b, ridge)
    u, rho, vt = np.linalg.svd((a @ wa).T @ (b @ wb) / (len(a) - 1), full_matrices=False)
    return np.clip(rho, 0.0, 1.0), wa @ u, wb @ vt.T


def held_out_correlations(a: np.ndarray, b: np.ndarray, ridge: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Directions fitted on a random half of the rows, correlations measured on the other half, (k,)."""
    perm = np.random.default_rng(seed).permutation(len(a))
    fit, test = perm[: len(a) // 2], perm[len(a) // 2 :]
    _, da, db = cca_directions(a[fit], b[fit], ridge)
    pa = (a[test] - a[test].mean(0)) @ da
    pb = (b[test] - b[test].mean(0)) @ db
    num = (pa * pb).sum(0)
    return num / np.sqrt((pa**2).sum(0) * (pb**2).sum(0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="feature file (.npy, items x F1)")
    p.add_argument("second", type=Path, help="feature file (.npy, items x F2), rows in the same item order")
    p.add_argument("--top", type=int, default=10, help="how many leading correlations to print")
    p.add_argument("--ridge", type=float, default=1e-3, help="whitening ridge, relative to the mean variance")
    args = p.parse_args(argv)
    try:
        a, b = np.load(args.first), np.load(args.second)
        rho, _, _ = cca_directions(a, b, args.ridge)
        held = held_out_correlations(a, b, args.ridge)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"first": str(args.first), "second": str(args.second), "items": int(a.shape[0]),
                      "in_sample": [round(float(r), 3) for r in rho[: args.top]],
                      "held_out": [round(float(r), 3) for r in held[: args.top]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

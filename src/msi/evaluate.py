"""Full-ranking evaluation (SPEC §4): every item is a candidate, seen items are masked, metrics are vectorized.

For a user u with ground truth T_u (its items in the split) and a top-K list with hit indicators h_1..h_K:
    Recall@K = sum h / |T_u|        Precision@K = sum h / K
    NDCG@K   = sum h_r / log2(r + 1) divided by the ideal DCG over min(K, |T_u|) ranks
    MAP@K    = (1 / min(K, |T_u|)) * sum_r h_r * Precision@r
    Hit@K    = 1 if sum h > 0 else 0   MRR@K = 1 / (rank of the first hit), 0 without a hit in the top K
averaged over the users with at least one row in the split. Scores run in user batches on the model's device.

``items`` restricts the ground truth, never the candidates: "warm" keeps the split's rows whose item has a train
row, "cold" those whose item has none (only a model that reads item features can rank such an item), "all" every
row; a user left with no row is not evaluated. Every item stays a candidate in every case.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from msi.config import METRICS
from msi.data.dataset import Dataset
from msi.data.graph import interaction_csr
from msi.errors import DataError, MSIError
from msi.models.base import Recommender
from msi.models.popularity import Popularity

ITEM_SETS = ("all", "warm", "cold")  # Evaluator(items=...), msi-eval and msi-compare --items


def topk_metrics(hits: torch.Tensor, n_true: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metrics from hits (B, Kmax) in rank order (0/1 float) and |T_u| (B,): name@k -> (B,)."""
    kmax = hits.shape[1]
    ranks = torch.arange(1, kmax + 1, device=hits.device, dtype=hits.dtype)
    discount = 1.0 / torch.log2(ranks + 1.0)  # (Kmax,)
    ideal = torch.cumsum(discount, 0)  # ideal DCG with r relevant items at the top: ideal[r - 1]
    cum_hits = torch.cumsum(hits, 1)
    prec_at_r = cum_hits / ranks  # (B, Kmax)
    before_first = (cum_hits == 0).sum(1).to(hits.dtype)  # (B,): ranks above the first hit, Kmax when none
    out = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        denom = torch.clamp(n_true, max=k).to(hits.dtype)
        out[f"recall@{k}"] = n_hit / n_true
        out[f"precision@{k}"] = n_hit / k
        out[f"ndcg@{k}"] = (h * discount[:k]).sum(1) / ideal[(denom.long() - 1)]
        out[f"map@{k}"] = (h * prec_at_r[:, :k]).sum(1) / denom
        out[f"hit@{k}"] = (n_hit > 0).to(hits.dtype)
        out[f"mrr@{k}"] = torch.where(before_first < k, 1.0 / (before_first + 1.0), 0.0)
    return out


def seen_masks(dataset: Dataset, device: torch.device | str, mask_valid_at_test: bool) -> dict[str, torch.Tensor]:
    """Per split, the (U, I) sparse CSR 0/1 mask of the items that are not candidates: each user's train items
    (and, at test with ``mask_valid_at_test``, the valid ones too)."""
    U, I = dataset.n_users, dataset.n_items
    train = interaction_csr(dataset.train, U, I).to(device)
    test = interaction_csr(np.concatenate([dataset.train, dataset.valid]), U, I).to(device) if mask_valid_at_test \
        else train
    return {"train": train, "valid": train, "test": test}


class Evaluator:
    """Holds the masks and ground truth of a data set on a device; call it with a model and a split.

    ``mask_valid_at_test``: also mask each user's valid items when scoring test (MMRec keeps them as candidates).
    ``items``: whose rows are the ground truth: "all", "warm" (items with a train row) or "cold" (the module doc).
    """

    def __init__(
        self, dataset: Dataset, device: torch.device | str = "cpu", ks: list[int] | tuple[int, ...] = (10, 20),
        batch_users: int = 4096, mask_valid_at_test: bool = False, items: str = "all",
    ) -> None:
        if items not in ITEM_SETS:
            raise MSIError(f"items {items!r}: expected one of {', '.join(ITEM_SETS)}")
        self.dataset, self.device, self.ks, self.batch_users = dataset, torch.device(device), list(ks), batch_users
        self.n_items, self.items = dataset.n_items, items
        self.seen = seen_masks(dataset, self.device, mask_valid_at_test)
        self._truth_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, dataset: Dataset, device: torch.device | str, cfg: Any, ks: list[int] | None = None,
                    mask_valid: bool = False, items: str = "all") -> Evaluator:
        """The evaluator a run's config describes (``cfg.eval``: ks, batch_users, mask_valid_at_test); ``ks``
        replaces the cut-offs, ``mask_valid`` masks valid items at test also when the config does not, ``items``
        restricts the ground truth (the module doc)."""
        e = cfg.eval
        return cls(dataset, device, e.ks if ks is None else ks, e.batch_users, e.mask_valid_at_test or mask_valid,
                   items)

    def _truth(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluated users (n,), their |T_u| (n,), and the sorted keys user * I + item of the split's rows."""
        if split not in self._truth_cache:
            self._truth_cache[split] = self._build_truth(split)
        return self._truth_cache[split]

    def _build_truth(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = np.unique(self.dataset.split(split), axis=0)
        if self.items != "all":
            warm = np.bincount(self.dataset.train[:, 1], minlength=self.n_items) > 0  # (I,) has a train row
            pairs = pairs[warm[pairs[:, 1]] == (self.items == "warm")]
        users, counts = np.unique(pairs[:, 0], return_counts=True)
        keys = pairs[:, 0] * self.n_items + pairs[:, 1]  # sorted, as pairs are sorted by (user, item)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return as_t(users), as_t(counts), as_t(keys)

    def __call__(self, model: Recommender, split: str = "valid", item_view: str = "id") -> dict[str, float]:
        """Average metrics over the split's users, as plain floats keyed ``recall@20`` etc."""
        users, values = self.per_user(model, split, item_view)
        return {name: float(v.sum()) / len(users) for name, v in values.items()}

    @torch.no_grad()
    def per_user(
        self, model: Recommender, split: str = "valid", item_view: str = "id"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The split's evaluated users (n,), ascending, and each metric per user: ``recall@20`` -> (n,) float64.

        NaN or +inf scores (a diverged model) are an MSIError: metrics computed from them would mean nothing.
        """
        was_training = model.training
        model.eval()
        users, n_true, keys = self._truth(split)
        if len(users) == 0:
            which = "" if self.items == "all" else f" with {self.items} items (--items {self.items})"
            raise DataError(f"{self.dataset.path}: the {split} split has no users to evaluate{which}")
        emb = model.embeddings()
        parts: dict[str, list[torch.Tensor]] = {f"{m}@{k}": [] for m in METRICS for k in self.ks}
        kmax = min(max(self.ks), self.n_items)
        n_bad = torch.zeros((), dtype=torch.long, device=self.device)  # checked once at the end: no sync per batch
        for start in range(0, len(users), self.batch_users):
            u = users[start : start + self.batch_users]
            top_scores, top = model.recommend(u, kmax, exclude=self.seen[split], item_view=item_view, emb=emb)
            n_bad += non_finite_users(top_scores)
            cand = u[:, None] * self.n_items + top  # (B, Kmax)
            pos = torch.searchsorted(keys, cand).clamp(max=len(keys) - 1)
            hits = (keys[pos] == cand).double()
            for name, v in topk_metrics(hits, n_true[start : start + self.batch_users], self.ks).items():
                parts[name].append(v)
        model.train(was_training)
        if n_bad:
            raise MSIError(f"the model's {split} scores are NaN or inf for {int(n_bad)} of {len(users)} users: "
                           "no metrics from a diverged model")
        return users, {name: torch.cat(v) for name, v in parts.items()}


def non_finite_users(top_scores: torch.Tensor) -> torch.Tensor:
    """How many rows of top-k scores (B, k) hold NaN or +inf (topk ranks both first; -inf marks masked items)."""
    return (torch.isnan(top_scores) | (top_scores == float("inf"))).any(1).sum()


def popularity_metrics(evaluator: Evaluator) -> dict[str, dict[str, float]]:
    """Valid and test metrics of items ranked by their train count: the floor a model must clear."""
    data = evaluator.dataset
    return {split: evaluator(Popularity(data.n_users, data.n_items, data.train).to(evaluator.device), split)
            for split in ("valid", "test")}

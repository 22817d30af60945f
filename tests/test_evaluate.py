"""msi/evaluate.py: the metrics against hand-computed values, masking, the item-view probe, batching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from msi.config import Config
from msi.data.dataset import Dataset, load_dataset
from msi.data.graph import interaction_csr
from msi.data.synth import generate
from msi.errors import DataError
from msi.evaluate import Evaluator, topk_metrics
from msi.models import Recommender, build_model


def lg(x: float) -> float:
    return math.log2(x)


# ---------------------------------------------------------------- topk_metrics on hit vectors


def hit_row(ranks: list[int], width: int = 20) -> list[float]:
    row = [0.0] * width
    for r in ranks:
        row[r - 1] = 1.0
    return row


# user A: |T| = 3, hits at ranks 1, 3 and 12;  user B: |T| = 1, hit at rank 2
EXPECTED_A = {
    # K = 2 < |T|: one hit (rank 1); the ideal DCG runs over min(2, 3) = 2 ranks; MAP divides by 2
    "recall@2": 1 / 3,
    "precision@2": 1 / 2,
    "ndcg@2": (1 / lg(2)) / (1 / lg(2) + 1 / lg(3)),
    "map@2": (1 / 1) / 2,  # Precision@1 = 1
    # K = 5 > |T|: hits at 1 and 3; ideal DCG over 3 ranks; MAP = (P@1 + P@3) / 3
    "recall@5": 2 / 3,
    "precision@5": 2 / 5,
    "ndcg@5": (1 / lg(2) + 1 / lg(4)) / (1 / lg(2) + 1 / lg(3) + 1 / lg(4)),
    "map@5": (1 / 1 + 2 / 3) / 3,
    # K = 20: all three hits; MAP = (P@1 + P@3 + P@12) / 3
    "recall@20": 3 / 3,
    "precision@20": 3 / 20,
    "ndcg@20": (1 / lg(2) + 1 / lg(4) + 1 / lg(13)) / (1 / lg(2) + 1 / lg(3) + 1 / lg(4)),
    "map@20": (1 / 1 + 2 / 3 + 3 / 12) / 3,
    # the first hit is at rank 1: a hit, reciprocal rank 1, at every K
    **{f"hit@{k}": 1.0 for k in (2, 5, 20)},
    **{f"mrr@{k}": 1 / 1 for k in (2, 5, 20)},
}
EXPECTED_B = {
    # one relevant item at rank 2: ideal DCG is 1 / log2(2) = 1 for every K; MAP = P@2 / 1
    **{f"recall@{k}": 1.0 for k in (2, 5, 20)},
    **{f"precision@{k}": 1 / k for k in (2, 5, 20)},
    **{f"ndcg@{k}": (1 / lg(3)) / 1.0 for k in (2, 5, 20)},
    **{f"map@{k}": (1 / 2) / 1 for k in (2, 5, 20)},
    # the first (only) hit at rank 2: inside every K here
    **{f"hit@{k}": 1.0 for k in (2, 5, 20)},
    **{f"mrr@{k}": 1 / 2 for k in (2, 5, 20)},
}


def test_topk_metrics_hand_computed_per_user():
    hits = torch.tensor([hit_row([1, 3, 12]), hit_row([2])], dtype=torch.float64)
    n_true = torch.tensor([3, 1])
    got = topk_metrics(hits, n_true, [2, 5, 20])
    assert set(got) == set(EXPECTED_A)
    for name in EXPECTED_A:
        assert got[name].shape == (2,)
        assert got[name][0].item() == pytest.approx(EXPECTED_A[name], abs=1e-12), name
        assert got[name][1].item() == pytest.approx(EXPECTED_B[name], abs=1e-12), name


def test_topk_metrics_no_hits_and_all_hits():
    hits = torch.tensor([hit_row([]), hit_row([1, 2])], dtype=torch.float64)
    got = topk_metrics(hits, torch.tensor([4, 2]), [1, 10])
    for name, v in got.items():
        assert v[0].item() == 0.0, name
    # a perfect list: recall, NDCG and MAP are 1; precision@10 = 2 / 10
    assert got["recall@10"][1].item() == 1.0
    assert got["ndcg@10"][1].item() == pytest.approx(1.0, abs=1e-12)
    assert got["map@10"][1].item() == pytest.approx(1.0, abs=1e-12)
    assert got["precision@10"][1].item() == pytest.approx(0.2, abs=1e-12)
    assert got["precision@1"][1].item() == 1.0
    assert got["hit@1"][1].item() == 1.0 and got["mrr@10"][1].item() == 1.0


def test_hit_and_mrr_count_only_a_first_hit_inside_k():
    # first hits at ranks 3, 4 and none: at K = 3 the second user has no hit yet
    hits = torch.tensor([hit_row([3, 4]), hit_row([4]), hit_row([])], dtype=torch.float64)
    got = topk_metrics(hits, torch.tensor([2, 1, 5]), [3, 4])
    assert got["hit@3"].tolist() == [1.0, 0.0, 0.0] and got["hit@4"].tolist() == [1.0, 1.0, 0.0]
    assert got["mrr@3"].tolist() == [1 / 3, 0.0, 0.0] and got["mrr@4"].tolist() == [1 / 3, 1 / 4, 0.0]


# ---------------------------------------------------------------- Evaluator with a model of known scores

N_ITEMS = 30


class FixedScores(Recommender):
    """A stub whose scores are fixed: id view s(u, i) = -i (item 0 best), image view s(u, i) = +i."""

    item_views = ("id", "image")

    def __init__(self, n_users: int, n_items: int = N_ITEMS) -> None:
        super().__init__()
        i = torch.arange(n_items, dtype=torch.float32)[:, None]
        self.emb = {"user": torch.ones(n_users, 1), "id": -i, "image": i}

    def embeddings(self) -> dict[str, torch.Tensor]:
        return dict(self.emb)


def pairs(*rows: tuple[int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


@pytest.fixture
def hand_data() -> Dataset:
    """Three users over 30 items.

    user 0: train {0, 5}, valid {2}, test {1, 3, 13}. In the id view, with 0 and 5 masked, the order is
            1, 2, 3, 4, 6, 7, ..., so the test items sit at ranks 1, 3 and 12 (user A above); with valid item 2
            masked too they sit at ranks 1, 2 and 11.
    user 1: train {0}, test {2}: rank 2 (user B above).
    user 2: train {1}, valid {0}: rank 1; no test rows, so it is not a test user.
    """
    train = pairs((0, 0), (0, 5), (1, 0), (2, 1))
    valid = pairs((0, 2), (2, 0))
    test = pairs((0, 1), (0, 3), (0, 13), (1, 2))
    return Dataset("hand", Path("."), 3, N_ITEMS, train, valid, test)


def test_evaluator_averages_hand_computed_users(hand_data):
    metrics = Evaluator(hand_data, "cpu", ks=[2, 5, 20])(FixedScores(3), "test")
    assert set(metrics) == set(EXPECTED_A)
    for name, v in metrics.items():
        assert isinstance(v, float)
        assert v == pytest.approx((EXPECTED_A[name] + EXPECTED_B[name]) / 2, abs=1e-12), name


def test_evaluator_valid_split(hand_data):
    # valid users 0 (item 2 at rank 2, after the masked 0) and 2 (item 0 at rank 1, item 1 masked)
    m = Evaluator(hand_data, "cpu", ks=[1, 2])(FixedScores(3), "valid")
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@2"] == pytest.approx((1 + 1) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / lg(3) + 1) / 2)
    assert m["map@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["hit@1"] == pytest.approx((0 + 1) / 2) and m["hit@2"] == 1.0
    assert m["mrr@1"] == pytest.approx((0 + 1) / 2) and m["mrr@2"] == pytest.approx((1 / 2 + 1) / 2)


def test_valid_items_stay_candidates_at_test_by_default_and_mask_option_removes_them(hand_data):
    model = FixedScores(3)
    default = Evaluator(hand_data, "cpu", ks=[2, 20])(model, "test")
    masked = Evaluator(hand_data, "cpu", ks=[2, 20], mask_valid_at_test=True)(model, "test")
    # default: user 0 hits at 1, 3, 12 -> recall@2 = 1/3; user 1 -> 1
    assert default["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    # valid item 2 masked: user 0 hits at ranks 1, 2, 11 -> recall@2 = 2/3; user 1 has no valid item: unchanged
    assert masked["recall@2"] == pytest.approx((2 / 3 + 1) / 2)
    ndcg_u0 = (1 / lg(2) + 1 / lg(3) + 1 / lg(12)) / (1 / lg(2) + 1 / lg(3) + 1 / lg(4))
    assert masked["ndcg@20"] == pytest.approx((ndcg_u0 + 1 / lg(3)) / 2)
    # the option is about test only: valid is scored the same either way
    e = Evaluator(hand_data, "cpu", ks=[2], mask_valid_at_test=True)
    assert e(model, "valid") == Evaluator(hand_data, "cpu", ks=[2])(model, "valid")


def test_warm_and_cold_items_restrict_the_ground_truth_not_the_candidates(hand_data):
    # train items {0, 1, 5}. Test rows: user 0 {1 warm, 3 cold, 13 cold}, user 1 {2 cold}. Id order for user 0
    # (0, 5 masked): 1, 2, 3, 4, 6, ...: 1 at rank 1, 3 at rank 3, 13 at rank 12; user 1 (0 masked): 2 at rank 2
    model = FixedScores(3)
    warm = Evaluator(hand_data, "cpu", ks=[2, 5], items="warm")
    users, values = warm.per_user(model, "test")
    assert users.tolist() == [0] and values["recall@2"].tolist() == [1.0]  # user 1 has no warm test item
    cold = Evaluator(hand_data, "cpu", ks=[2, 5], items="cold")
    users, values = cold.per_user(model, "test")
    assert users.tolist() == [0, 1]
    assert values["recall@2"].tolist() == [0.0, 1.0]  # rank 3 is outside 2 though warm item 1 is not the truth
    assert values["recall@5"].tolist() == [0.5, 1.0]
    everything = Evaluator(hand_data, "cpu", ks=[2, 5])(model, "test")
    assert everything == Evaluator(hand_data, "cpu", ks=[2, 5], items="all")(model, "test")
    with pytest.raises(DataError, match=r"no users to evaluate with warm items \(--items warm\)"):
        Evaluator(Dataset("hand", Path("."), 3, N_ITEMS, pairs((0, 0)), pairs((0, 2)), pairs((1, 3))), "cpu",
                  ks=[2], items="warm")(model, "test")


def test_item_view_probe_scores_with_the_modality(hand_data):
    # image view: s(u, i) = +i, so the order is 29, 28, ...: user 0's items 13, 3, 1 sit at ranks 17, 26, 28
    # (5 is masked above 3 and 1); user 1's item 2 at rank 28 (0 masked, below it)
    m = Evaluator(hand_data, "cpu", ks=[20])(FixedScores(3), "test", item_view="image")
    assert m["recall@20"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["ndcg@20"] == pytest.approx((1 / lg(18)) / (1 / lg(2) + 1 / lg(3) + 1 / lg(4)) / 2)
    with pytest.raises(ValueError, match="audio"):
        Evaluator(hand_data, "cpu", ks=[20])(FixedScores(3), "test", item_view="audio")


def test_user_batches_do_not_change_the_result(hand_data):
    model = FixedScores(3)
    whole = Evaluator(hand_data, "cpu", ks=[2, 5, 20])(model, "test")
    assert Evaluator(hand_data, "cpu", ks=[2, 5, 20], batch_users=1)(model, "test") == pytest.approx(whole, abs=1e-15)


def test_evaluator_restores_training_mode_and_rejects_an_empty_split(hand_data):
    model = FixedScores(3).train()
    ev = Evaluator(hand_data, "cpu", ks=[2])
    ev(model, "test")
    assert model.training
    empty = Dataset("e", Path("."), 3, N_ITEMS, hand_data.train, pairs(), hand_data.test)
    with pytest.raises(DataError, match="valid"):
        Evaluator(empty, "cpu", ks=[2])(model, "valid")


# ---------------------------------------------------------------- masking with real lists


class LovesTrainItems(Recommender):
    """Scores 1 for a user's train items and 0 elsewhere: unmasked, its top-k is the train items themselves."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.user = interaction_csr(dataset.train, dataset.n_users, dataset.n_items).to_dense()  # (U, I)
        self.items = torch.eye(dataset.n_items)  # (I, I)

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {"user": self.user, "id": self.items}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("eval-data")
    generate("tiny", root / "tiny", seed=0, progress=False)
    return load_dataset(root, "tiny", {"image": "image_feat.npy", "text": "text_feat.npy"})


def _train_sets(dataset: Dataset) -> list[set[int]]:
    seen = [set() for _ in range(dataset.n_users)]
    for u, i in dataset.train:
        seen[u].add(int(i))
    return seen


@pytest.mark.parametrize("model_kind", ["loves_train", "msi"])
def test_recommend_with_exclude_never_lists_a_train_item(tiny_data, model_kind):
    torch.manual_seed(0)
    if model_kind == "msi":
        model = build_model(Config(), tiny_data).eval()
    else:
        model = LovesTrainItems(tiny_data)
    users = torch.arange(tiny_data.n_users)
    exclude = interaction_csr(tiny_data.train, tiny_data.n_users, tiny_data.n_items)
    seen = _train_sets(tiny_data)
    k = 20
    _, unmasked = model.recommend(users, k, exclude_seen=False)
    assert any(seen[u] & set(unmasked[u].tolist()) for u in range(tiny_data.n_users))  # the test has teeth
    scores, items = model.recommend(users, k, exclude=exclude)
    assert items.shape == (tiny_data.n_users, k)
    for u in range(tiny_data.n_users):
        listed = set(items[u].tolist())
        assert len(listed) == k
        assert not listed & seen[u], f"user {u} got train items {listed & seen[u]}"
    assert torch.isfinite(scores).all()  # tiny has 40 items and <= 20 train items per user
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_evaluator_masks_train_items(tiny_data):
    """A model that ranks each user's train items first scores as if they were absent: the masked lists start
    with the best unseen items, so a test item still gets hits."""
    model = LovesTrainItems(tiny_data)
    ev = Evaluator(tiny_data, "cpu", ks=[5])
    exclude = ev.seen["test"]
    _, items = model.recommend(torch.arange(tiny_data.n_users), 5, exclude=exclude)
    seen = _train_sets(tiny_data)
    assert all(not set(items[u].tolist()) & seen[u] for u in range(tiny_data.n_users))
    # with train items masked every remaining score is 0: the evaluator's metrics equal those of that list
    users = np.unique(tiny_data.test[:, 0])
    test_sets = {u: set(tiny_data.test[tiny_data.test[:, 0] == u, 1].tolist()) for u in users}
    recall = np.mean([len(set(items[u].tolist()) & test_sets[u]) / len(test_sets[u]) for u in users])
    assert ev(model, "test")["recall@5"] == pytest.approx(recall, abs=1e-12)

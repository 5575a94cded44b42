"""Recall@K / NDCG@K against hand-computed values; the popularity baseline."""

import math

import pytest
import torch

from rastp.evaluation import per_user_metrics, popularity_ranking, ranking_metrics, standard_errors


def test_ranking_metrics_match_hand_computed_values():
    ranked = torch.tensor([
        [7, 3, 9, 1, 2, 5, 6, 8, 0, 4],   # target 7 at rank 1
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],   # target 6 at rank 6: outside the top 5
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],   # target 11 absent
        [5, 4, 8, -1, -1, -1, -1, -1, -1, -1],  # target 8 at rank 3, short list
    ])
    targets = torch.tensor([7, 6, 11, 8])
    m = ranking_metrics(ranked, targets, ks=(5, 10))
    assert m["recall@5"].item() == pytest.approx(2 / 4)
    assert m["recall@10"].item() == pytest.approx(3 / 4)
    assert m["ndcg@5"].item() == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"].item() == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(4)) / 4)


def test_standard_errors_match_hand_computed_values():
    ranked = torch.tensor([[7, 3], [1, 2], [1, 2], [5, 4]])
    per_user = per_user_metrics(ranked, torch.tensor([7, 2, 11, 8]), ks=(2,))
    assert per_user["recall@2"].tolist() == [1, 1, 0, 0]
    # recall: values 1, 1, 0, 0 -> sample std sqrt(1/3), over sqrt(4) users
    assert standard_errors(per_user)["recall@2"] == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-6)
    # ndcg: values 1, 1/log2(3), 0, 0
    ndcg = [1, 1 / math.log2(3), 0, 0]
    mean = sum(ndcg) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in ndcg) / 3)
    assert standard_errors(per_user)["ndcg@2"] == pytest.approx(std / 2, abs=1e-6)
    assert standard_errors(per_user_metrics(ranked[:1], torch.tensor([7]), ks=(2,))) == {"recall@2": None, "ndcg@2": None}


def test_empty_slots_never_match_and_short_lists_are_rejected():
    m = ranking_metrics(torch.full((2, 10), -1), torch.tensor([0, 3]), ks=(10,))
    assert m["recall@10"].item() == 0
    with pytest.raises(ValueError, match="at least 10"):
        ranking_metrics(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]), ks=(10,))


def test_popularity_counts_training_histories_only():
    # training history = all but the last two items of each sequence
    sequences = [[2, 2, 1, 0, 3], [1, 2, 0, 0], [1, 3, 3]]
    top = popularity_ranking(sequences, num_items=4, k=4)
    # counts over histories [2,2,1], [1,2], [1]: item 1 -> 3, item 2 -> 3, items 0 and 3 -> 0
    assert top.tolist() == [1, 2, 0, 3]


def test_popularity_skips_each_users_seen_items():
    sequences = [[2, 2, 1, 0, 3], [1, 2, 0, 0], [1, 3, 3]]  # popularity order: 1, 2, 0, 3
    seen = torch.tensor([[1, -1, -1], [2, 0, -1], [3, 1, 2]])
    top = popularity_ranking(sequences, num_items=4, k=2, seen=seen)
    assert top.tolist() == [[2, 0], [1, 3], [0, -1]]  # the last row has one unseen item left

"""How sequences become TIGER examples and token batches."""

import numpy as np
import pytest
import torch

from rastp.training import PAD, SequenceBatches, SidVocabulary, make_examples


def test_every_prefix_of_the_training_history_is_an_example():
    sequences = [[0, 1, 2, 3, 4, 5], [5, 4, 3]]
    train = make_examples(sequences, "train", max_history=2)
    # user 0: history [0,1,2,3] -> targets 1,2,3 ; user 1: history [5] -> no example
    assert [(e.user, list(e.history), e.target) for e in train] == [(0, [0], 1), (0, [0, 1], 2), (0, [1, 2], 3)]
    valid = make_examples(sequences, "valid", max_history=2)
    assert [(list(e.history), e.target) for e in valid] == [([2, 3], 4), ([5], 4)]
    test = make_examples(sequences, "test", max_history=2)
    assert [(list(e.history), e.target) for e in test] == [([3, 4], 5), ([5, 4], 3)]


def test_vocabulary_offsets_put_each_level_in_its_own_range():
    vocab = SidVocabulary(level_sizes=(4, 4, 2), user_buckets=3)
    assert vocab.offsets.tolist() == [1, 5, 9] and vocab.user_offset == 11 and vocab.size == 14
    assert vocab.item_tokens(np.array([[0, 3, 1], [3, 0, 0]])).tolist() == [[1, 8, 10], [4, 5, 9]]
    with pytest.raises(ValueError, match="do not fit"):
        vocab.item_tokens(np.array([[0, 4, 0]]))
    assert all(11 <= vocab.user_token(u)[0] < 14 for u in range(20))


def test_collate_pads_right_and_labels_are_the_target_sid():
    vocab = SidVocabulary(level_sizes=(4, 2), user_buckets=0)
    item_tokens = vocab.item_tokens(np.array([[0, 0], [1, 1], [3, 0]]))
    data = SequenceBatches(make_examples([[0, 1, 2, 1, 0]], "train", max_history=5), item_tokens, vocab)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].tolist() == [[1, 5, PAD, PAD], [1, 5, 2, 6]]
    assert batch["attention_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["labels"].tolist() == [item_tokens[1].tolist(), item_tokens[2].tolist()]
    assert torch.equal(batch["target"], torch.tensor([1, 2]))

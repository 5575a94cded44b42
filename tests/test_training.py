"""How sequences become TIGER examples and token batches, and how the optimizer steps."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from rastp import config
from rastp.beam_search import SidCatalogue, beam_search
from rastp.config import ConfigError
from rastp.evaluation import rank_examples
from rastp.training import (PAD, SequenceBatches, SequenceDataModule, SidVocabulary, TigerModule, ValidateLastStep,
                            length_order, make_examples, make_optimizer, train_tiger)


def test_every_prefix_of_the_training_history_is_an_example():
    sequences = [[0, 1, 2, 3, 4, 5], [5, 4, 3]]
    train = make_examples(sequences, "train", max_history=2)
    # user 0: history [0,1,2,3] -> targets 1,2,3 ; user 1: history [5] -> no example
    assert [(e.user, list(e.history), e.target) for e in train] == [(0, [0], 1), (0, [0, 1], 2), (0, [1, 2], 3)]
    valid = make_examples(sequences, "valid", max_history=2)
    assert [(list(e.history), e.target) for e in valid] == [([2, 3], 4), ([5], 4)]
    test = make_examples(sequences, "test", max_history=2)
    assert [(list(e.history), e.target) for e in test] == [([3, 4], 5), ([5, 4], 3)]
    # what the user already had before the target, uncut by max_history (excluded from rankings)
    assert [list(e.seen) for e in valid] == [[0, 1, 2, 3], [5]]
    assert [list(e.seen) for e in test] == [[0, 1, 2, 3, 4], [5, 4]]


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
    assert batch["seen"].shape == (2, 0)  # training examples carry no seen items
    test = SequenceBatches(make_examples([[0, 1, 2, 1], [2, 1, 0]], "test", max_history=1), item_tokens, vocab)
    assert test.collate([test[0], test[1]])["seen"].tolist() == [[0, 1, 2], [2, 1, -1]]


@pytest.mark.parametrize("name, expected_steps", [("adafactor", (0.01, 0.0005)), ("adamw", (0.01, 0.01))])
def test_adafactor_steps_are_relative_to_each_weight_and_adamw_steps_are_not(name, expected_steps):
    # A gradient of constant magnitude: both optimizers' first update is lr x sign(gradient); Adafactor scales it by
    # the weight's RMS (1 for T5's embeddings, 0.05 here for a projection), AdamW does not.
    signs = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])
    weights = torch.nn.ParameterList([torch.nn.Parameter(torch.full((2, 3), rms)) for rms in (1.0, 0.05)])
    before = [w.detach().clone() for w in weights]
    optimizer, _ = make_optimizer(weights, name, lr=0.01, weight_decay=0.0, warmup_steps=0, total_steps=100)
    sum(3.0 * (w * signs).sum() for w in weights).backward()
    optimizer.step()
    for w, start, step in zip(weights, before, expected_steps):
        torch.testing.assert_close(w.detach(), start - step * signs)


def test_learning_rate_warms_up_then_decays_or_stays_and_unknown_choices_are_refused():
    def rates(schedule):
        weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2))])
        optimizer, scheduler = make_optimizer(weights, "adamw", lr=1.0, weight_decay=0.0, warmup_steps=10,
                                              total_steps=110, schedule=schedule)
        seen = []
        for _ in range(110):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    cosine, constant = rates("cosine"), rates("constant")
    assert cosine[:3] == pytest.approx([0.1, 0.2, 0.3]) and cosine[9] == pytest.approx(1.0)
    assert cosine[60] == pytest.approx(0.55) and cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert constant[:10] == cosine[:10] and constant[10:] == pytest.approx([1.0] * 100)
    weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ConfigError, match="train.optimizer: 'sgd'"):
        make_optimizer(weights, "sgd", lr=1.0, weight_decay=0.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ConfigError, match="train.schedule: 'linear'"):
        make_optimizer(weights, "adamw", lr=1.0, weight_decay=0.0, warmup_steps=0, total_steps=10, schedule="linear")


def tiny_lightning_setup(rastp: dict) -> tuple[TigerModule, SequenceDataModule]:
    """A TIGER of a few weights on 12 users of 16 items (8 batches of 4 per epoch), with the given `tiger.rastp`."""
    vocab = SidVocabulary(level_sizes=(4, 4), user_buckets=0)
    item_tokens = vocab.item_tokens(np.array([[i % 4, i // 4] for i in range(16)]))
    rng = np.random.default_rng(0)
    data = SequenceDataModule([rng.permutation(16)[:8].tolist() for _ in range(12)], item_tokens, vocab,
                              max_history=4, batch_size=4, eval_batch_size=4)
    model = {"vocab_size": vocab.size, "sid_length": 2, "num_layers": 2, "num_decoder_layers": 1, "d_model": 16,
             "num_heads": 2, "d_kv": 8, "d_ff": 32, "dropout": 0.0, "max_input_length": 8, "rastp": rastp}
    module = TigerModule(model, item_tokens, optimizer="adafactor", lr=0.01, weight_decay=0.0, warmup_steps=0,
                         schedule="cosine", val_beam_size=4)
    return module, data


@pytest.mark.parametrize("validate_last_step, expected", [(False, [3, 6]), (True, [3, 6, 7])])
def test_the_last_step_is_validated_whatever_the_validation_interval(validate_last_step, expected):
    module, data = tiny_lightning_setup({"enabled": False})
    validated = []

    class ValidationSteps(L.Callback):
        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                validated.append(trainer.global_step)

    callbacks = [ValidationSteps()] + ([ValidateLastStep(7)] if validate_last_step else [])
    L.Trainer(max_steps=7, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
              callbacks=callbacks).fit(module, datamodule=data)
    assert validated == expected and module.global_step == 7


def test_lightning_training_prunes_the_first_until_of_its_steps():
    module, data = tiny_lightning_setup({"enabled": True, "prune_layer": 1, "keep_ratio": 0.5, "keep_ratio_of": "row",
                                         "until": 0.75})
    longest, widths = [], []  # per step: the batch's longest history, the last encoder block's input width
    module.model.t5.encoder.block[-1].register_forward_hook(lambda block, args, out: widths.append(args[0].shape[1]))

    class LongestHistory(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            longest.append(int(batch["attention_mask"].sum(dim=1).max()))

    L.Trainer(max_steps=8, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[LongestHistory()]).fit(module, datamodule=data)
    # The first 6 of 8 steps keep half of each history (`row`: the widest keeps ceil(half its tokens)), the last 2 all
    assert widths == [math.ceil(n / 2) for n in longest[:6]] + longest[6:]
    assert len(widths) == 8 and all(n >= 2 for n in longest)


def test_evaluation_batches_histories_of_like_lengths_and_answers_in_the_examples_order():
    module, data = tiny_lightning_setup({"enabled": False})
    rng = np.random.default_rng(1)
    sequences = [rng.permutation(16)[:n].tolist() for n in rng.permutation(np.arange(4, 16))]  # lengths shuffled
    examples = make_examples(sequences, "valid", max_history=8)
    order = length_order(examples)
    assert [len(examples[i].history) for i in order] == sorted(len(e.history) for e in examples)
    assert len({len(e.history) for e in examples}) == 7  # histories of 2..8 items
    valid = SequenceBatches(examples, data.sets["train"].item_tokens, data.sets["train"].vocab)
    catalogue = SidCatalogue(torch.from_numpy(valid.item_tokens))
    ranked, targets = rank_examples(module.model, valid, catalogue, beam_size=4, batch_size=5, top_k=4,
                                    exclude_seen=False, device=torch.device("cpu"))[:2]
    assert targets.tolist() == [e.target for e in examples]
    batch = valid.collate(examples)  # all at once, in the examples' own order
    expected = beam_search(module.model, batch["input_ids"], batch["attention_mask"], catalogue, beam_size=4, top_k=4)
    assert torch.equal(ranked, expected.items)
    # The exact search from a beam of 1 (alone: lists of one item) ranks as a beam as wide as the catalogue (16 items)
    one, exact, full = (rank_examples(module.model, valid, catalogue, beam_size=beam_size, batch_size=5, top_k=4,
                                      exclude_seen=False, device=torch.device("cpu"), exact=exact)
                        for beam_size, exact in ((1, False), (1, True), (16, False)))
    assert (one.items[:, 1:] == -1).all() and torch.equal(exact.items, full.items)
    assert torch.equal(exact.beam_items, one.items) and one.beam_items is None
    loader = data.val_dataloader()  # validation batches by length too
    assert list(loader.sampler) == length_order(data.sets["valid"].examples)


def test_a_validation_beam_narrower_than_the_validation_list_is_refused_before_training(tmp_path):
    cfg, _ = config.load(["dataset=ml100k", "train.val_beam_size=5"])
    with pytest.raises(ConfigError, match=r"train.val_beam_size: 5 is below the 10 items a validation list"):
        train_tiger([[0, 1, 2]], np.zeros((3, 2), dtype=np.int64), [4, 4], config.to_dict(cfg), tmp_path / "tiger.pt",
                    tmp_path / "checkpoints", tmp_path / "live", seed=0)
    assert not any(tmp_path.iterdir())

import itertools

import pytest
import torch

from rastp.beam_search import SidCatalogue, beam_search, exact_top_k, generate_top_k
from rastp.tiger import Tiger

# Token layout of the tests: 0 = pad/start, level l codes at 1 + 4 * l + code (4 codes per level), users above.
CODES, LEVELS, VOCAB = 4, 3, 1 + 4 * 3 + 5


def make_catalogue(num_items, seed=0) -> SidCatalogue:
    generator = torch.Generator().manual_seed(seed)
    all_sids = torch.tensor(list(itertools.product(range(CODES), repeat=LEVELS)))
    sids = all_sids[torch.randperm(len(all_sids), generator=generator)[:num_items]]
    return SidCatalogue(1 + CODES * torch.arange(LEVELS) + sids)


def make_model(tie_embeddings=True, catalogue_softmax=False, **rastp) -> Tiger:
    torch.manual_seed(0)
    return Tiger(vocab_size=VOCAB, sid_length=LEVELS, num_layers=2, num_decoder_layers=2, d_model=32, num_heads=4,
                 d_kv=8, d_ff=64, tie_embeddings=tie_embeddings, catalogue_softmax=catalogue_softmax, rastp=rastp)


def allowed_by_brute_force(sids: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """[B, S, V]: the tokens that some catalogue SID has at position l after the label's first l tokens."""
    allowed = torch.zeros(len(labels), LEVELS, VOCAB, dtype=torch.bool)
    for row, label in enumerate(labels):
        for level in range(LEVELS):
            for sid in sids:
                if sid[:level] == label[:level]:
                    allowed[row, level, sid[level]] = True
    return allowed


def make_histories(batch_size=6, length=10):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (batch_size, length), generator=generator)
    mask = (torch.arange(length)[None, :] < torch.randint(2, length + 1, (batch_size, 1), generator=generator)).long()
    return input_ids * mask, mask


@torch.no_grad()
def exhaustive_scores(model, input_ids, mask, catalogue) -> torch.Tensor:
    """[B, N] log-probability of every catalogue SID, teacher forcing all of them."""
    model.eval()
    hidden, hidden_mask = model.encode(input_ids, mask)
    batch_size, num_items = len(input_ids), len(catalogue)
    labels = catalogue.sid_tokens.repeat(batch_size, 1)
    # catalogue_softmax: each token's softmax over the catalogue's continuations of its prefix, found independently
    allowed = (allowed_by_brute_force(catalogue.sid_tokens.tolist(), labels.tolist()) if model.catalogue_softmax
               else None)
    token_scores = model.sid_log_probs(hidden.repeat_interleave(num_items, 0),
                                       hidden_mask.repeat_interleave(num_items, 0), labels, allowed)
    return token_scores.sum(-1).view(batch_size, num_items)


def test_catalogue_trie():
    catalogue = SidCatalogue(torch.tensor([[1, 5, 9], [1, 5, 10], [2, 6, 9]]))
    assert [t.tolist() for t in catalogue.level_tokens] == [[1, 2], [5, 6], [9, 10]]
    assert catalogue.children[0].tolist() == [[0, 1]]  # root -> prefixes (1,) and (2,)
    assert catalogue.children[1].tolist() == [[0, -1], [-1, 1]]  # (1,) -> (1, 5); (2,) -> (2, 6)
    assert catalogue.children[2].tolist() == [[0, 1], [2, -1]]  # (1, 5) -> items 0 and 1; (2, 6) -> item 2
    with pytest.raises(ValueError, match="duplicate"):
        SidCatalogue(torch.tensor([[1, 5, 9], [1, 5, 9]]))


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False}, {"catalogue_softmax": True},
                                     {"enabled": True, "at_eval": True, "keep_ratio": 0.5}])
def test_full_beam_is_exact(options):
    catalogue = make_catalogue(40)
    model = make_model(**options).train()
    input_ids, mask = make_histories()
    result = beam_search(model, input_ids, mask, catalogue, beam_size=len(catalogue), top_k=10)
    assert model.training  # mode restored
    expected_scores, expected_items = exhaustive_scores(model, input_ids, mask, catalogue).topk(10, dim=1)
    assert torch.equal(result.items, expected_items)
    torch.testing.assert_close(result.scores, expected_scores)
    assert result.num_short == 0


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False},
                                     {"enabled": True, "at_eval": True, "keep_ratio": 0.5}])
@pytest.mark.parametrize("beam_size", [40, 5])
def test_transformers_generate_finds_the_same_lists(options, beam_size):
    """The stock `generate` (the evaluation benchmark's reference), constrained to the trie, on the same encoder states:
    the same items in the same order, exact (beam as large as the catalogue) or not."""
    catalogue = make_catalogue(40)
    model = make_model(**options)
    input_ids, mask = make_histories()
    ours = beam_search(model, input_ids, mask, catalogue, beam_size=beam_size, top_k=5)
    theirs = generate_top_k(model, input_ids, mask, catalogue, beam_size=beam_size, top_k=5)
    assert torch.equal(theirs, ours.items) and (theirs >= 0).all()
    if beam_size == len(catalogue):
        assert torch.equal(theirs, exhaustive_scores(model, input_ids, mask, catalogue).topk(5).indices)


@pytest.mark.parametrize("options", [{}, {"catalogue_softmax": True},
                                     {"enabled": True, "at_eval": True, "keep_ratio": 0.5}])
@pytest.mark.parametrize("max_beams", [10_000, 1])  # 1: every history overflows and is searched again alone
@pytest.mark.parametrize("group_size", [4, 32])
def test_exact_top_k_from_a_narrow_beam_is_the_exhaustive_top_k(options, max_beams, group_size):
    catalogue = make_catalogue(40)
    model = make_model(**options)
    input_ids, mask = make_histories()
    expected_scores, expected_items = exhaustive_scores(model, input_ids, mask, catalogue).topk(10, dim=1)
    narrow = beam_search(model, input_ids, mask, catalogue, beam_size=2, top_k=10)
    assert narrow.num_short == len(input_ids)  # a beam of 2 ends with 2 items: the exact search finds the other 8
    exact = exact_top_k(model, input_ids, mask, catalogue, top_k=10, beam_size=2, group_size=group_size,
                        max_beams=max_beams)
    assert torch.equal(exact.items, expected_items)
    torch.testing.assert_close(exact.scores, expected_scores)
    assert exact.num_short == 0
    assert exact.searched_alone == (len(input_ids) if max_beams == 1 else 0)
    seen = expected_items[:, :3]  # the best three are left out: the next ten come out, with the same scores
    expected_scores, expected_items = exhaustive_scores(model, input_ids, mask, catalogue).scatter(
        1, seen, float("-inf")).topk(10, dim=1)
    exact = exact_top_k(model, input_ids, mask, catalogue, top_k=10, beam_size=3, seen=seen, group_size=group_size,
                        max_beams=max_beams)
    assert torch.equal(exact.items, expected_items)
    torch.testing.assert_close(exact.scores, expected_scores)


def test_exact_top_k_of_a_catalogue_smaller_than_k_returns_every_item():
    catalogue = make_catalogue(3)
    model = make_model()
    input_ids, mask = make_histories(batch_size=4)
    exact = exact_top_k(model, input_ids, mask, catalogue, top_k=5, beam_size=1)
    expected = exhaustive_scores(model, input_ids, mask, catalogue).topk(3, dim=1).indices
    assert torch.equal(exact.items[:, :3], expected) and (exact.items[:, 3:] == -1).all()
    assert exact.num_short == 4 and exact.searched_alone == 0  # no threshold, but only 3 prefixes per level


def test_narrow_beam_returns_valid_items_with_true_scores():
    catalogue = make_catalogue(40)
    model = make_model()
    input_ids, mask = make_histories()
    result = beam_search(model, input_ids, mask, catalogue, beam_size=5, top_k=5)
    exhaustive = exhaustive_scores(model, input_ids, mask, catalogue)
    assert (result.items >= 0).all() and (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    assert all(len(set(row)) == 5 for row in result.items.tolist())
    torch.testing.assert_close(result.scores, exhaustive.gather(1, result.items))


def test_short_lists_are_counted():
    catalogue = make_catalogue(3)
    model = make_model()
    input_ids, mask = make_histories(batch_size=4)
    for beam_size in (2, 8):  # fewer beams than top_k, and more beams than items
        result = beam_search(model, input_ids, mask, catalogue, beam_size=beam_size, top_k=5)
        found = min(beam_size, 3)
        assert result.items.shape == result.scores.shape == (4, 5)
        assert result.num_short == 4
        assert (result.items[:, :found] >= 0).all() and (result.items[:, found:] == -1).all()
        assert torch.isfinite(result.scores[:, :found]).all() and (result.scores[:, found:] == float("-inf")).all()
    assert beam_search(model, input_ids, mask, catalogue, beam_size=8, top_k=3).num_short == 0


def test_allowed_tokens_are_the_tries_children():
    catalogue = make_catalogue(40)
    labels = catalogue.sid_tokens[torch.tensor([0, 7, 7, 39])]
    expected = allowed_by_brute_force(catalogue.sid_tokens.tolist(), labels.tolist())
    assert torch.equal(catalogue.allowed_tokens(labels, VOCAB), expected)
    assert expected[:, 0].sum(1).tolist() == [CODES] * 4  # 40 of 64 SIDs use every first-level code
    assert (expected.sum(-1) < CODES).any()  # and some prefixes do not have every child
    missing = next(sid for sid in itertools.product(range(CODES), repeat=LEVELS)
                   if list(1 + CODES * torch.arange(LEVELS) + torch.tensor(sid)) not in catalogue.sid_tokens.tolist())
    with pytest.raises(ValueError, match="not a catalogue SID"):
        catalogue.allowed_tokens((1 + CODES * torch.arange(LEVELS) + torch.tensor(missing))[None], VOCAB)


def test_catalogue_softmax_is_a_distribution_over_the_catalogue():
    """Its SID scores sum to 1 over the catalogue's items (a vocabulary softmax leaves mass on other tokens), and its
    training loss is the mean of the same per-token log-probabilities."""
    catalogue = make_catalogue(40)
    input_ids, mask = make_histories()
    for catalogue_softmax in (False, True):
        model = make_model(catalogue_softmax=catalogue_softmax)
        total = exhaustive_scores(model, input_ids, mask, catalogue).logsumexp(dim=1)
        assert torch.allclose(total, torch.zeros(len(total)), atol=1e-5) == catalogue_softmax
    labels = catalogue.sid_tokens[torch.arange(len(input_ids)) * 5]
    loss = model(input_ids, mask, labels, catalogue.allowed_tokens(labels, VOCAB))
    scores = exhaustive_scores(model, input_ids, mask, catalogue)  # eval mode, as the loss above (no dropout)
    rows = torch.arange(len(input_ids))
    torch.testing.assert_close(loss, -scores[rows, rows * 5].mean() / LEVELS)
    with pytest.raises(ValueError, match="allowed_tokens must be given"):
        model(input_ids, mask, labels)


@pytest.mark.parametrize("catalogue_softmax", [False, True])
def test_seen_items_never_come_out_and_the_rest_stay_exact(catalogue_softmax):
    """With `seen`, a full beam returns exactly the top-k of the exhaustive scores over the other items, with their
    unchanged scores; a narrow beam wastes no place on a prefix whose items are all seen."""
    catalogue = make_catalogue(40)
    model = make_model(catalogue_softmax=catalogue_softmax)
    input_ids, mask = make_histories()
    exhaustive = exhaustive_scores(model, input_ids, mask, catalogue)
    # Each row has seen its 12 best items (so the unfiltered top 10 is gone) and a whole first-level prefix.
    best = exhaustive.topk(12, dim=1).indices
    first_code = catalogue.sid_tokens[:, 0]
    prefix_items = torch.nonzero(first_code == first_code[0]).flatten()
    seen = torch.cat([best, prefix_items.expand(len(best), -1), torch.full((len(best), 3), -1)], dim=1)
    result = beam_search(model, input_ids, mask, catalogue, beam_size=len(catalogue), top_k=10, seen=seen)
    is_seen = torch.zeros_like(exhaustive, dtype=torch.bool)
    for row, items in enumerate(seen.tolist()):
        is_seen[row, [item for item in items if item >= 0]] = True
    expected_scores, expected_items = exhaustive.masked_fill(is_seen, float("-inf")).topk(10, dim=1)
    assert torch.equal(result.items, expected_items)
    torch.testing.assert_close(result.scores, expected_scores)
    narrow = beam_search(model, input_ids, mask, catalogue, beam_size=3, top_k=3, seen=seen)
    assert narrow.num_short == 0 and not is_seen.gather(1, narrow.items).any()


def test_open_nodes_close_prefixes_whose_items_are_all_seen():
    catalogue = SidCatalogue(torch.tensor([[1, 5, 9], [1, 5, 10], [2, 6, 9]]))
    open_nodes = catalogue.open_nodes(torch.tensor([[0, 1], [2, -1], [-1, -1]]))
    assert [nodes.tolist() for nodes in open_nodes] == [
        [[False, True], [True, False], [True, True]],  # prefixes (1,) and (2,)
        [[False, True], [True, False], [True, True]],  # prefixes (1, 5) and (2, 6)
        [[False, False, True], [True, True, False], [True, True, True]],  # items
    ]


@pytest.mark.parametrize("options", [{}, {"catalogue_softmax": True}])
@pytest.mark.parametrize("last_level", ["varied", "one child"])
def test_last_level_scores_only_the_beams_that_can_reach_the_top_k(options, last_level, monkeypatch):
    """Given top_k < beam_size, the last level skips every beam whose prefix scores below the top_k-th item found
    among the first top_k beams: the same top_k as scoring every beam, for fewer decoder rows. With one child per
    prefix at the last level (a collision-free extra level) and the catalogue softmax, an item scores what its prefix
    does: only the first top_k beams are scored."""
    catalogue = make_catalogue(40)
    if last_level == "one child":
        prefixes = torch.unique(catalogue.sid_tokens[:, :-1], dim=0)
        last_code = prefixes.new_full((len(prefixes), 1), 1 + CODES * (LEVELS - 1))  # the last level's code 0
        catalogue = SidCatalogue(torch.cat([prefixes, last_code], dim=1))
    model = make_model(**options)
    input_ids, mask = make_histories()
    beam_size, top_k = 12, 3
    rows_per_step = []
    beam_step = model.beam_step
    monkeypatch.setattr(model, "beam_step", lambda tokens, *args: rows_per_step.append(len(tokens))
                        or beam_step(tokens, *args))
    every_beam = beam_search(model, input_ids, mask, catalogue, beam_size=beam_size, top_k=beam_size)
    assert rows_per_step[-1] == len(input_ids) * beam_size  # top_k = beam_size: every beam is scored
    rows_per_step.clear()
    result = beam_search(model, input_ids, mask, catalogue, beam_size=beam_size, top_k=top_k)
    assert torch.equal(result.items, every_beam.items[:, :top_k])
    torch.testing.assert_close(result.scores, every_beam.scores[:, :top_k])
    first, *more = rows_per_step[LEVELS - 1:]  # the last level: the first top_k beams, then those that reach the bar
    assert first == len(input_ids) * top_k
    if last_level == "one child" and options:
        assert more == []
    assert first + sum(more) <= len(input_ids) * beam_size

"""Exact, batched constrained beam search over the semantic-ID trie.

Every catalogue item has a semantic ID of S tokens; the trie of these IDs constrains decoding so that only real items
come out. The trie is stored level by level as dense tensors (no Python loop over beams at decoding time):

    level_tokens[l]  LongTensor [C_l]           the distinct tokens found at position l of any SID
    children[l]      LongTensor [P_l, C_l]      the child of prefix node p through token level_tokens[l][c]: a prefix
                                                node of level l+1, or at the last level the item index; -1: no child

A SID's score is its log-probability under the model, the sum of its tokens' log-probabilities: each token's softmax is
over the whole vocabulary (stock T5), or with `Tiger.catalogue_softmax` over the trie's children of its prefix only
(then the scores are a distribution over the catalogue's items). With beam_size >= the number of items no prefix is
ever dropped, so the search is exact; `exact_top_k` gets the same exact top-K from a narrow beam, by keeping every
prefix that scores at least the beam's K-th item.

Cost: the history is encoded once, the decoder's cross-attention keys/values are projected once per history (not per
beam, see `Tiger.beam_step`), each step feeds one token per beam with a self-attention KV cache (`BeamCache`), the
first step (the empty prefix, the same for all beams) runs once per history, and the last level scores only the beams
that can still reach the top-K (`_last_level`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.modeling_outputs import BaseModelOutput

from rastp.tiger import BeamCache, Tiger


class SidCatalogue:
    """The semantic-ID trie of a catalogue, built once from its item -> SID token matrix [N, S] (rows distinct)."""

    def __init__(self, sid_tokens: torch.LongTensor):
        sid_tokens = torch.as_tensor(sid_tokens, dtype=torch.long)
        if sid_tokens.dim() != 2 or len(sid_tokens) == 0:
            raise ValueError(f"sid_tokens must be a non-empty [N, S] matrix, got shape {tuple(sid_tokens.shape)}")
        if len(torch.unique(sid_tokens, dim=0)) != len(sid_tokens):
            raise ValueError("sid_tokens has duplicate rows: two items share a semantic ID")
        self.sid_tokens = sid_tokens
        self.level_tokens: list[torch.Tensor] = []
        self.children: list[torch.Tensor] = []
        self.item_nodes: list[torch.Tensor] = []  # [N] per level l: each item's node at level l+1 (last: the item)
        num_items, sid_length = sid_tokens.shape
        node = torch.zeros(num_items, dtype=torch.long)  # every item's prefix node at level 0: the root
        for level in range(sid_length):
            tokens, column = torch.unique(sid_tokens[:, level], return_inverse=True)
            if level + 1 < sid_length:
                child = torch.unique(sid_tokens[:, : level + 1], dim=0, return_inverse=True)[1]
            else:
                child = torch.arange(num_items)
            table = torch.full((int(node.max()) + 1, len(tokens)), -1, dtype=torch.long)
            table[node, column] = child
            self.level_tokens.append(tokens)
            self.children.append(table)
            self.item_nodes.append(child)
            node = child

    def __len__(self) -> int:
        return len(self.sid_tokens)

    def allowed_tokens(self, sids: torch.LongTensor, vocab_size: int) -> torch.Tensor:
        """[B, S, V] bool: at position l, the tokens that follow sids[:, :l] in some catalogue SID (the trie's
        children of that prefix). Every row of `sids` [B, S] must be a catalogue SID."""
        allowed = torch.zeros((*sids.shape, vocab_size), dtype=torch.bool, device=sids.device)
        node = torch.zeros(len(sids), dtype=torch.long, device=sids.device)
        for level, (tokens, children) in enumerate(zip(self.level_tokens, self.children)):
            allowed[:, level, tokens] = children[node] >= 0
            column = torch.searchsorted(tokens, sids[:, level].contiguous()).clamp(max=len(tokens) - 1)
            node = children[node, column]
            if ((tokens[column] != sids[:, level]) | (node < 0)).any():
                raise ValueError("allowed_tokens: a row of sids is not a catalogue SID")
        return allowed

    def open_nodes(self, seen: torch.LongTensor) -> list[torch.Tensor]:
        """Per level l, [B, P_{l+1}] bool: whether the node at level l+1 (at the last level: the item) still leads to
        an item outside the row's `seen` items ([B, M] item indices, -1 = padding)."""
        num_items = len(self)
        is_seen = torch.zeros((len(seen), num_items + 1), dtype=torch.bool, device=seen.device)
        is_seen.scatter_(1, seen.masked_fill(seen < 0, num_items), True)
        unseen = (~is_seen[:, :num_items]).long()
        num_nodes = [len(table) for table in self.children[1:]] + [num_items]
        return [torch.zeros((len(seen), size), dtype=torch.long, device=seen.device).index_add_(1, nodes, unseen) > 0
                for nodes, size in zip(self.item_nodes, num_nodes)]

    @property
    def device(self) -> torch.device:
        return self.sid_tokens.device

    @cached_property
    def next_tokens(self) -> dict[tuple[int, ...], list[int]]:
        """Each SID prefix (a tuple of tokens, the empty one included) -> the tokens that follow it in the catalogue,
        as Python lists: what transformers' `prefix_allowed_tokens_fn` returns for a beam."""
        children: dict[tuple[int, ...], set[int]] = {}
        for sid in self.sid_tokens.tolist():
            for level, token in enumerate(sid):
                children.setdefault(tuple(sid[:level]), set()).add(token)
        return {prefix: sorted(tokens) for prefix, tokens in children.items()}

    @cached_property
    def item_of_sid(self) -> dict[tuple[int, ...], int]:
        """Each SID (a tuple of tokens) -> its item index."""
        return {tuple(sid): item for item, sid in enumerate(self.sid_tokens.tolist())}

    def to(self, device: torch.device | str) -> SidCatalogue:
        """This catalogue with its tensors on `device` (in place; a no-op when already there)."""
        self.sid_tokens = self.sid_tokens.to(device)
        self.level_tokens = [tokens.to(device) for tokens in self.level_tokens]
        self.children = [table.to(device) for table in self.children]
        self.item_nodes = [nodes.to(device) for nodes in self.item_nodes]
        return self


@dataclass
class BeamSearchResult:
    items: torch.LongTensor  # [B, top_k] item indices, best first; -1 where fewer than top_k SIDs were found
    scores: torch.Tensor  # [B, top_k] SID log-probabilities (sum over its tokens); -inf where items is -1
    num_short: int  # how many lists have fewer than top_k items
    searched_alone: int = 0  # exact_top_k: histories that needed more than max_beams, searched again one by one
    beam_items: torch.LongTensor | None = None  # exact_top_k: the top_k of the beam search it started from


# Scores of one history computed in different batches differ by float rounding (~1e-6 here): the exact search keeps
# prefixes this much below its threshold too, so that no rounding drops an item of the top-K.
SCORE_TOLERANCE = 1e-3


@torch.no_grad()
def beam_search(model: Tiger, input_ids: torch.LongTensor, attention_mask: torch.Tensor, catalogue: SidCatalogue,
                *, beam_size: int, top_k: int, seen: torch.LongTensor | None = None) -> BeamSearchResult:
    """The top_k catalogue items for each history, by trie-constrained beam search with the decoder's KV cache.

    `seen` [B, M] (item indices, -1 = padding): items that may not come out for that row (what the user already has).
    A prefix all of whose items are seen is closed like one that is not in the trie, so no beam is spent on it and the
    search stays exact; each item keeps its score (a catalogue softmax is not renormalised over the unseen items).

    Runs the model in eval mode (RASTP prunes only if `at_eval`) and restores its mode afterwards.
    """
    with _eval_mode(model):
        encoded = _encode(model, input_ids, attention_mask)
        items, scores, _ = _search(model, encoded, catalogue.to(input_ids.device), beam_size, seen, top_k=top_k)
    return _first(top_k, items, scores)


@torch.no_grad()
def exact_top_k(model: Tiger, input_ids: torch.LongTensor, attention_mask: torch.Tensor, catalogue: SidCatalogue,
                *, top_k: int, beam_size: int, seen: torch.LongTensor | None = None, group_size: int = 32,
                max_beams: int = 32768) -> BeamSearchResult:
    """The exact top_k catalogue items of each history (as scoring every catalogue SID would rank them, ties aside),
    at a small part of that cost: a beam search of `beam_size`, then a search that keeps every prefix scoring at least
    the beam's k-th item.

    Why it is exact: a prefix's score (the sum of its tokens' log-probabilities, each <= 0) never rises as it grows, so
    every item scoring at least t has all its prefixes at or above t; the beam's k-th item is a real item, so the true
    k-th best scores at least t too. The second search runs on groups of `group_size` histories of like thresholds (a
    low one keeps many prefixes, and a group's widest history sets its width), each at most `max_beams` wide in all; a
    history that needs more is searched again alone with no limit (the catalogue's size). `seen` as in `beam_search`.
    Runs the model in eval mode and restores its mode afterwards.
    """
    catalogue = catalogue.to(input_ids.device)
    seen = None if seen is None else seen.to(input_ids.device)  # indexed below by rows on the model's device
    with _eval_mode(model):
        encoded = _encode(model, input_ids, attention_mask)  # once, for both searches
        items, scores, _ = _search(model, encoded, catalogue, beam_size, seen, top_k=top_k)
        result = _first(top_k, items, scores)  # its rows are overwritten with the exact lists below
        beam_items = result.items.clone()
        # The k-th item's score; -inf (keep every prefix) where the beam found fewer than top_k items.
        threshold = result.scores[:, -1] - SCORE_TOLERANCE

        def search_exactly(rows: torch.LongTensor, width: int) -> torch.LongTensor:
            """Fills in the given rows' exact lists; returns those that needed more than `width` beams."""
            items, scores, overflow = _search(model, encoded.rows(rows), catalogue, width,
                                              None if seen is None else seen[rows], threshold[rows])
            found = _first(top_k, items, scores)
            result.items[rows], result.scores[rows] = found.items, found.scores
            return rows[overflow]

        too_wide = torch.cat([search_exactly(rows, max(beam_size, max_beams // len(rows)))
                              for rows in threshold.argsort().split(group_size)])
        for row in too_wide:
            search_exactly(row[None], len(catalogue))
    result.num_short = int((result.items < 0).any(dim=1).sum())
    result.searched_alone = len(too_wide)
    result.beam_items = beam_items
    return result


def _first(top_k: int, items: torch.LongTensor, scores: torch.Tensor) -> BeamSearchResult:
    """The first top_k of best-first items and scores [B, W], padded with -1 / -inf where W < top_k."""
    batch_size, found = items.shape
    if found >= top_k:
        items, scores = items[:, :top_k], scores[:, :top_k]
    else:
        items = torch.cat([items, items.new_full((batch_size, top_k - found), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((batch_size, top_k - found), float("-inf"))], dim=1)
    return BeamSearchResult(items=items, scores=scores, num_short=int((items < 0).any(dim=1).sum()))


@contextmanager
def _eval_mode(model: Tiger):
    """The model in eval mode (no dropout; RASTP prunes only if `at_eval`), its own mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class _Encoded:
    """What the decoder reads of a batch of histories: the encoder's mask [B, T'] and each decoder block's
    cross-attention keys and values, projected once per history (`Tiger.cross_attention_keys_values`)."""

    mask: torch.Tensor
    cross_keys_values: list[tuple[torch.Tensor, ...]]

    def rows(self, rows: torch.LongTensor) -> _Encoded:
        return _Encoded(self.mask[rows], [tuple(t[rows] for t in pair) for pair in self.cross_keys_values])


def _encode(model: Tiger, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> _Encoded:
    hidden_states, mask = model.encode(input_ids, attention_mask)
    return _Encoded(mask, model.cross_attention_keys_values(hidden_states))


def _search(model: Tiger, encoded: _Encoded, catalogue: SidCatalogue, beam_size: int, seen: torch.LongTensor | None,
            threshold: torch.Tensor | None = None,
            top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items [B, W] and scores [B, W] of the final beams, best first (-1 / -inf for beams that found no SID), and
    [B] bool: the histories that had more prefixes at or above `threshold` than the beam could hold.

    Each level keeps, per history, its `beam_size` best prefixes; with `threshold` [B] instead every prefix scoring at
    least the history's threshold (the batch's widest history sets the width W), at most `beam_size`. Given `top_k`,
    only the best top_k final beams are wanted: the last level then skips every beam that cannot reach them
    (`_last_level`), and W = top_k.
    """
    batch_size, device = encoded.mask.shape[0], encoded.mask.device
    cache = BeamCache.empty(len(model.t5.decoder.block))  # the decoder's self-attention keys/values of each prefix
    # One beam per history to start, the empty prefix: the first step runs once per history, then beams fan out.
    scores = torch.zeros((batch_size, 1), device=device)
    node = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # decoder start token
    overflow = torch.zeros(batch_size, dtype=torch.bool, device=device)
    history = torch.arange(batch_size, device=device)[:, None]
    levels = len(catalogue.children)
    open_nodes = None if seen is None else catalogue.open_nodes(seen.to(device))

    def continuations(level: int, beams: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B, w * C_l] of the given beams' continuations by one token of the level, and the trie nodes they
        reach [B, w, C_l] (-1: none)."""
        width = node.shape[1]
        rows = (history * width + torch.arange(width, device=device)[beams]).flatten()
        step_cache = cache if rows.numel() == batch_size * width else cache.select(rows)
        # The level's tokens: log-probabilities of the vocabulary softmax, or logits still to be normalised below.
        token_scores = model.beam_step(tokens[rows], step_cache, encoded.cross_keys_values, encoded.mask).float()
        if not model.catalogue_softmax:
            token_scores = token_scores.log_softmax(dim=-1)
        level_tokens, beam_node = catalogue.level_tokens[level], node[:, beams]
        child = catalogue.children[level][beam_node.clamp(min=0)]  # dead beams (node -1) have score -inf anyway
        log_probs = token_scores[:, level_tokens].view(*child.shape).masked_fill(child < 0, float("-inf"))
        if model.catalogue_softmax:  # softmax over the prefix's children only
            log_probs = log_probs.log_softmax(dim=-1)
        if open_nodes is not None:  # after the softmax: excluding items does not change the others' scores
            reachable = open_nodes[level].gather(1, child.clamp(min=0).flatten(1)).view_as(child)
            log_probs = log_probs.masked_fill(~reachable, float("-inf"))
        return (scores[:, beams, None] + log_probs).flatten(1), child

    for level in range(levels):
        width, num_tokens = node.shape[1], len(catalogue.level_tokens[level])
        if level + 1 == levels and top_k is not None and threshold is None and width > top_k:
            total, child = _last_level(continuations, scores, top_k)
            next_width = min(top_k, total.shape[1])
        else:
            total, child = continuations(level, slice(None))
            if threshold is None:
                next_width = min(beam_size, total.shape[1])
            else:
                reached = ((total >= threshold[:, None]) & total.isfinite()).sum(dim=1)  # -inf: not in the catalogue
                next_width = int(reached.max().clamp(min=1, max=beam_size))
                overflow |= reached > next_width
        scores, best = total.topk(next_width, dim=1)
        node = child.flatten(1).gather(1, best)
        tokens = catalogue.level_tokens[level][best % num_tokens].flatten()
        if level + 1 < levels:
            cache = cache.select((history * width + best // num_tokens).flatten())
    return node.masked_fill(scores == float("-inf"), -1), scores, overflow


def _last_level(continuations, scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last level's continuations of the beams that can still reach a history's best top_k items (the rest
    cannot: an item scores at most its prefix, each token's log-probability being <= 0).

    The beams are best first: the first top_k beams are scored, their top_k-th item sets a bar, and only the other
    beams whose prefix reaches the bar are scored after them. Where the last level is the collision-free extra level
    (one child per prefix, which a trained model all but certainly emits), the bar falls just below the top_k-th
    prefix: on 2000 Beauty test users, beams of 20 and top-10, 10.0 beams per user were scored (10.06 unpruned).
    """
    total, child = continuations(-1, slice(None, top_k))
    bar = total.topk(min(top_k, total.shape[1]), dim=1).values[:, -1]  # -inf where fewer than top_k items came out
    more = int((scores[:, top_k:] >= bar[:, None]).sum(dim=1).max())
    if more == 0:
        return total, child
    rest_total, rest_child = continuations(-1, slice(top_k, top_k + more))
    return torch.cat([total, rest_total], dim=1), torch.cat([child, rest_child], dim=1)


@torch.no_grad()
def generate_top_k(model: Tiger, input_ids: torch.LongTensor, attention_mask: torch.Tensor, catalogue: SidCatalogue,
                   *, beam_size: int, top_k: int) -> torch.LongTensor:
    """The top_k items [B, top_k] found by transformers' stock `generate` (`num_beams`, constrained to the trie by
    `prefix_allowed_tokens_fn`, no length penalty), best first; -1 for a sequence that is not a catalogue SID. The
    reference `beam_search` is tested and benchmarked against.

    Both decode from the same encoder states, `Tiger.encode`'s (pruned when RASTP prunes at evaluation), and rank a
    SID by the sum of its tokens' log-probabilities under the vocabulary softmax. Runs the model in eval mode and
    restores its mode afterwards.
    """
    if model.catalogue_softmax:
        raise ValueError("generate_top_k: transformers' generate takes each token's softmax over the whole vocabulary; "
                         "a model with catalogue_softmax scores over the trie's children")
    if not top_k <= beam_size:
        raise ValueError(f"generate_top_k: generate returns at most beam_size={beam_size} lists, not top_k={top_k}")
    sid_length = catalogue.sid_tokens.shape[1]
    next_tokens = catalogue.next_tokens
    with _eval_mode(model):
        hidden_states, mask = model.encode(input_ids, attention_mask)
        sequences = model.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden_states), attention_mask=mask,
            num_beams=beam_size, num_return_sequences=top_k, max_new_tokens=sid_length, min_new_tokens=sid_length,
            do_sample=False, length_penalty=0.0, early_stopping=True,
            # sent[0] is the decoder start token. A beam off the trie (there are more beams than the catalogue has
            # prefixes) may only go on with padding: generate refuses an empty list; its score stays -inf.
            prefix_allowed_tokens_fn=lambda _, sent: next_tokens.get(tuple(sent[1:].tolist()), [0]))
    return torch.tensor([catalogue.item_of_sid.get(tuple(sid), -1) for sid in sequences[:, 1:].tolist()],
                        device=input_ids.device).view(-1, top_k)

"""evaluate stage: constrained beam search on the test targets; Recall@K and NDCG@K against
a most-popular baseline on the same leave-one-out split (one target per user, full catalogue),
with the standard error of each mean."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from rastp.data import split_user


def per_user_metrics(ranked: torch.Tensor, targets: torch.Tensor, ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """Recall@k and NDCG@k [B] of each ranked list [B, >=k] (item ids, -1 = empty slot) for its one target."""
    hits = ranked == targets.to(ranked.device)[:, None]  # at most one hit per row: SIDs map to distinct items
    discount = 1.0 / torch.log2(torch.arange(ranked.shape[1], device=ranked.device, dtype=torch.float32) + 2)
    out = {}
    for k in ks:
        if k > ranked.shape[1]:
            raise ValueError(f"need lists of at least {k} items, got {ranked.shape[1]}")
        out[f"recall@{k}"] = hits[:, :k].any(dim=1).float()
        out[f"ndcg@{k}"] = (hits[:, :k].float() * discount[:k]).sum(dim=1)
    return out


def ranking_metrics(ranked: torch.Tensor, targets: torch.Tensor, ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """Mean Recall@k and NDCG@k over the lists (see `per_user_metrics`)."""
    return {name: values.mean() for name, values in per_user_metrics(ranked, targets, ks).items()}


def metric_means(per_user: dict[str, torch.Tensor], digits: int = 5) -> dict[str, float]:
    """Each metric's mean over the users (see `per_user_metrics`), rounded to `digits`."""
    return {name: round(float(values.mean()), digits) for name, values in per_user.items()}


def standard_errors(per_user: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """The standard error of each metric's mean: sample standard deviation / sqrt(users) (None for one user)."""
    return {name: round(float(values.std() / math.sqrt(len(values))), 6) if len(values) > 1 else None
            for name, values in per_user.items()}


def popularity_ranking(sequences: Sequence[Sequence[int]], num_items: int, k: int,
                       seen: torch.LongTensor | None = None) -> torch.Tensor:
    """The k items seen most often in the training histories (ties: lower item id first) [k]; with `seen` ([B, M] item
    ids, -1 = padding) each row's k most popular items outside its own seen ones [B, k] (-1 where fewer are left)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for items in sequences:
        np.add.at(counts, split_user(items)[0], 1)
    order = torch.from_numpy(np.argsort(-counts, kind="stable").copy())
    if seen is None:
        return order[:k]
    # A row's k first unseen items lie among the k + M most popular: mark each row's seen ones there by rank.
    candidates = order[: k + seen.shape[1]]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_items)
    positions = torch.where(seen >= 0, rank[seen.clamp(min=0)], len(candidates)).clamp(max=len(candidates))
    blocked = torch.zeros((len(seen), len(candidates) + 1), dtype=torch.bool).scatter_(1, positions, True)[:, :-1]
    first = torch.argsort(blocked.to(torch.int8), dim=1, stable=True)[:, :k]
    return torch.where(blocked.gather(1, first), -1, candidates[first])


class Rankings(NamedTuple):
    items: torch.Tensor  # [N, top_k] ranked item ids, best first (-1: empty slot)
    targets: torch.Tensor  # [N]
    num_short: int  # lists with fewer than top_k items
    beam_items: torch.Tensor | None  # exact search: the lists of the beam it started from [N, top_k]


def rank_examples(model, data, catalogue, *, beam_size: int, batch_size: int, top_k: int, exclude_seen: bool,
                  device: torch.device, exact: bool = False) -> Rankings:
    """Beam-search every example of `data` (a SequenceBatches), in the examples' order. With `exclude_seen` no list
    holds an item its user already had; with `exact` each list is the exact top_k (`exact_top_k`, from a beam of
    `beam_size`). Batches histories of like lengths together (`length_order`)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from rastp.beam_search import beam_search, exact_top_k
    from rastp.training import length_order

    search = exact_top_k if exact else beam_search
    order = length_order(data.examples)
    ranked, targets, beam_ranked, num_short = [], [], [], 0
    with torch.inference_mode():
        for batch in tqdm(DataLoader(data, batch_size=batch_size, sampler=order, collate_fn=data.collate),
                          desc="exact search" if exact else "beam search", unit="batch"):
            found = search(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), catalogue,
                           beam_size=beam_size, top_k=top_k, seen=batch["seen"] if exclude_seen else None)
            ranked.append(found.items.cpu())
            targets.append(batch["target"])
            num_short += found.num_short
            if exact:
                beam_ranked.append(found.beam_items.cpu())
    position = torch.tensor(order)

    def in_example_order(batches: list[torch.Tensor]) -> torch.Tensor | None:
        if not batches:
            return None
        rows = torch.cat(batches)
        return torch.empty_like(rows).index_copy_(0, position, rows)

    return Rankings(items=in_example_order(ranked), targets=in_example_order(targets), num_short=num_short,
                    beam_items=in_example_order(beam_ranked))


def evaluate_tiger(model_path, sequences: Sequence[Sequence[int]], sids: np.ndarray, *, max_history: int,
                   beam_size: int, batch_size: int, ks: Sequence[int], exclude_seen: bool, exact: bool,
                   seed: int) -> dict:
    """Test-split metrics of a saved TIGER and of the most-popular baseline, plus search stats. With `exclude_seen`
    neither ranks an item the user already had (no user of MovieLens-100k or Beauty has an item twice, so none of them
    can be the target); with `exact` TIGER's lists are its exact top-K, else its beam's, and the beam's are scored
    beside them (`tiger_beam`, with the paired standard errors of `exact_minus_beam`). `seed` seeds RASTP's `random`
    score where the model prunes at test time."""
    from rastp.beam_search import SidCatalogue
    from rastp.training import SequenceBatches, load_model, make_examples, pad_rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = load_model(model_path, map_location=device)
    model.generator = torch.Generator(device=device).manual_seed(seed)
    item_tokens = vocab.item_tokens(sids)
    examples = make_examples(sequences, "test", max_history)
    data = SequenceBatches(examples, item_tokens, vocab)
    catalogue = SidCatalogue(torch.from_numpy(item_tokens)).to(device)
    rankings = rank_examples(model, data, catalogue, beam_size=beam_size, batch_size=batch_size, top_k=max(ks),
                             exclude_seen=exclude_seen, device=device, exact=exact)
    targets = rankings.targets
    tiger = per_user_metrics(rankings.items, targets, ks)
    seen = pad_rows([e.seen for e in examples], -1) if exclude_seen else None
    popular_items = popularity_ranking(sequences, len(sids), max(ks), seen=seen).expand(len(targets), -1)
    popular = per_user_metrics(popular_items, targets, ks)
    metrics = {
        "tiger": metric_means(tiger, digits=6),
        "popularity": metric_means(popular, digits=6),
        # Both rank the same users' targets: the paired difference says whether TIGER beats popularity.
        "standard_error": {"tiger": standard_errors(tiger), "popularity": standard_errors(popular),
                           "tiger_minus_popularity": standard_errors({name: tiger[name] - popular[name]
                                                                      for name in tiger})},
        "users": len(targets),
        "search": "exact" if exact else "beam",
        "short_lists": rankings.num_short,
    }
    if exact:
        beam = per_user_metrics(rankings.beam_items, targets, ks)
        metrics["tiger_beam"] = metric_means(beam, digits=6)
        metrics["standard_error"]["exact_minus_beam"] = standard_errors({name: tiger[name] - beam[name]
                                                                         for name in tiger})
        metrics["beam_lists_exact"] = int((rankings.beam_items == rankings.items).all(dim=1).sum())
    return metrics

"""Non-neural reference points on a prepared dataset's validation and test targets (not a test).

    python bench/transition_baseline.py [--dataset ml100k]

- popularity: the items seen most often in the training histories (the evaluate stage's baseline);
- transitions: an item-to-item Markov model counted on the training histories: item b after item a within
  `--window` steps adds 1/gap to T[a, b]; a user's score is the sum of T[a] over their last `--recent` items,
  the latest weighted most (`--decay` per step back), with popularity as the tie-breaker.
Same leave-one-out split, full ranking and metrics as the evaluate stage. Says how much of a dataset's signal is
plain sequential co-occurrence, which a TIGER trained for a fraction of an epoch has not learnt yet.
Prints a table and writes bench/results/transition_baseline_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rastp.data import split_user
from rastp.evaluation import popularity_ranking, ranking_metrics
from rastp.io import write_json


def transition_counts(histories: list[list[int]], num_items: int, window: int) -> np.ndarray:
    counts = np.zeros((num_items, num_items), dtype=np.float32)
    for items in histories:
        items = np.asarray(items)
        for gap in range(1, window + 1):
            np.add.at(counts, (items[:-gap], items[gap:]), 1.0 / gap)
    return counts


def transition_ranking(counts: np.ndarray, popularity: np.ndarray, inputs: list[list[int]], recent: int,
                       decay: float, k: int) -> torch.Tensor:
    ranked = []
    for history in inputs:
        weights = decay ** np.arange(min(recent, len(history)))
        scores = weights @ counts[history[::-1][:recent]] + 1e-6 * popularity
        ranked.append(np.argsort(-scores, kind="stable")[:k])
    return torch.from_numpy(np.stack(ranked))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml100k")
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--recent", type=int, default=5)
    ap.add_argument("--decay", type=float, default=0.7)
    args = ap.parse_args()
    folder = Path("data/prepared") / args.dataset
    sequences = [json.loads(line)["items"] for line in open(folder / "users.jsonl")]
    num_items = json.loads((folder / "stats.json").read_text())["items"]
    splits = [split_user(items) for items in sequences]
    histories = [history for history, _, _ in splits]
    popularity = np.bincount(np.concatenate(histories), minlength=num_items).astype(np.float32)
    counts = transition_counts(histories, num_items, args.window)
    inputs = {"valid": histories, "test": [history + [valid] for history, valid, _ in splits]}
    targets = {"valid": [valid for _, valid, _ in splits], "test": [test for _, _, test in splits]}
    results = {}
    for split in ("valid", "test"):
        target = torch.tensor(targets[split])
        rankings = {"popularity": popularity_ranking(sequences, num_items, 10).expand(len(target), -1),
                    "transitions": transition_ranking(counts, popularity, inputs[split], args.recent, args.decay, 10)}
        results[split] = {name: {m: round(float(v), 6) for m, v in ranking_metrics(r, target, (5, 10)).items()}
                          for name, r in rankings.items()}
    print(f"{args.dataset}: {len(sequences)} users, {num_items} items")
    print(f"{'split':<6} {'model':<12} {'R@5':>7} {'N@5':>7} {'R@10':>7} {'N@10':>7}")
    for split, models in results.items():
        for name, m in models.items():
            print(f"{split:<6} {name:<12} {m['recall@5']:>7.4f} {m['ndcg@5']:>7.4f} {m['recall@10']:>7.4f} "
                  f"{m['ndcg@10']:>7.4f}")
    out = f"bench/results/transition_baseline_{args.dataset}.json"
    write_json(out, {"dataset": args.dataset, "window": args.window, "recent": args.recent, "decay": args.decay,
                     "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""What a trained TIGER has learnt, level by level (a diagnostic, not a test).

    python bench/sid_signal.py dataset=ml100k [the hand run's overrides, e.g. codebook.method=rqkmeans]

For the validation and test targets, per SID level: the model's cross-entropy (teacher-forced, nats) against the
SID prior's, p(code_l | codes before l) counted on the training targets (add-one smoothing towards the level's
marginal). The prior is what a decoder that ignores the history achieves: a model at the prior has learnt which SIDs
exist and how popular they are, not the user. Also: the share of the model's top-10 (beam search, the evaluate
stage's beam) that are items already in the user's history.
Prints the figures and writes bench/results/sid_signal_<dataset>[_<hand-run hash>].json.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from rastp import config
from rastp.beam_search import SidCatalogue
from rastp.data import load_prepared
from rastp.evaluation import rank_examples
from rastp.io import write_json
from rastp.training import SequenceBatches, load_model, make_examples


def sid_prior_cross_entropy(train_sids: np.ndarray, eval_sids: np.ndarray) -> np.ndarray:
    """Per level, the mean -log p(code_l | codes before l) of `eval_sids` [N, S] under counts of `train_sids`."""
    out = []
    for level in range(train_sids.shape[1]):
        codes, counts = np.unique(train_sids[:, level], return_counts=True)
        marginal = dict(zip(codes.tolist(), ((counts + 1) / (counts.sum() + len(codes) + 1)).tolist()))
        unseen = 1 / (counts.sum() + len(codes) + 1)
        joint = Counter(map(tuple, train_sids[:, : level + 1].tolist()))
        prefix = Counter(map(tuple, train_sids[:, :level].tolist()))
        log_probs = [np.log((joint[tuple(row)] + marginal.get(row[-1], unseen)) / (prefix[tuple(row[:-1])] + 1))
                     for row in eval_sids[:, : level + 1].tolist()]
        out.append(-float(np.mean(log_probs)))
    return np.array(out)


@torch.no_grad()
def model_cross_entropy(model, data: SequenceBatches, catalogue: SidCatalogue, batch_size: int = 256) -> np.ndarray:
    """Per level, the model's mean teacher-forced cross-entropy of the examples' target SIDs (with its softmax: over
    the vocabulary, or with `catalogue_softmax` over the catalogue's continuations of the prefix)."""
    total = None
    for start in range(0, len(data), batch_size):
        batch = data.collate(data.examples[start:start + batch_size])
        hidden, mask = model.encode(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        allowed = (catalogue.allowed_tokens(labels, model.t5.config.vocab_size) if model.catalogue_softmax
                   else None)
        ce = -model.sid_log_probs(hidden, mask, labels, allowed).sum(0)
        total = ce if total is None else total + ce
    return (total / len(data)).numpy()


def main(argv: list[str]) -> None:
    cfg, paths = config.load(argv)  # the model and SIDs of DVC's outputs, or of the hand run with these overrides
    sequences = load_prepared(paths.prepared()).sequences
    sids = np.load(paths.sids() / "sids.npy")
    model, vocab = load_model(paths.model() / "tiger.pt")
    item_tokens = vocab.item_tokens(sids)
    catalogue = SidCatalogue(torch.from_numpy(item_tokens))
    max_history = int(cfg.tiger.max_history)
    train_targets = [e.target for e in make_examples(sequences, "train", max_history)]
    results = {}
    for split in ("valid", "test"):
        examples = make_examples(sequences, split, max_history)
        data = SequenceBatches(examples, item_tokens, vocab)
        prior = sid_prior_cross_entropy(sids[train_targets], sids[[e.target for e in examples]])
        learnt = model_cross_entropy(model, data, catalogue)
        # The model's own top 10, seen items allowed: how much of it the user already had.
        ranked = rank_examples(model, data, catalogue, beam_size=int(cfg.evaluate.beam_size),
                               batch_size=int(cfg.evaluate.batch_size), top_k=10, exclude_seen=False,
                               device=torch.device("cpu"), exact=bool(cfg.evaluate.exact)).items
        seen = [set(e.seen) for e in examples]
        seen_share = float(np.mean([[int(i) in seen[u] for i in row] for u, row in enumerate(ranked.tolist())]))
        as_list = lambda values: [round(float(v), 3) for v in values]  # noqa: E731
        results[split] = {"model_ce": as_list(learnt), "sid_prior_ce": as_list(prior),
                          "top10_already_seen": round(seen_share, 3)}
        print(f"{paths.dataset} {split}: per-level cross-entropy (nats), model {as_list(learnt)} vs SID prior "
              f"{as_list(prior)}; top-10 already in the history: {seen_share:.1%}")
    write_json(Path("bench/results") / f"sid_signal_{paths.result_name()}.json", {"args": argv, **results})


if __name__ == "__main__":
    main(sys.argv[1:])

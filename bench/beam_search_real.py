"""The beam search on a trained model and real users: against transformers' `generate`, and against the exact top-10.

    python bench/beam_search_real.py dataset=beauty [the train stage's overrides] [--users 2000]

Takes the stage scripts' arguments and loads what the train stage saved for them (`data/models/<ds>/tiger.pt`, or a
hand run's under `runs/`), with the dataset's prepared data and semantic IDs. The same test users (a fixed random
subset; `--users 0`: all) are decoded by our `beam_search` and by `generate_top_k` (transformers' `generate` with
`num_beams` and `prefix_allowed_tokens_fn` over the trie) at `evaluate.beam_size` and `evaluate.batch_size`, in fp32
(as the evaluate stage) or with `--precision bf16` both under bf16 autocast (bf16 matmuls, fp32 weights; for a device
that multiplies bf16 in hardware), from the same encoder states and in the same batches; the two searches take turns
batch by batch, after an untimed warm-up batch each, so that machine load hits them alike. Four settings:
- the model pruned at test time as the evaluate stage scores it (its `tiger.rastp.at_eval`) and the other way;
- batches of histories of like lengths, as the evaluate stage forms them (`length_order`), and batches in the users'
  own order, as a plain DataLoader forms them.
For each: users/s of both and the speed-up (target: >= 5x), how many top-10 lists are identical and, where they
differ, which list the model scores higher in fp32 (the sum of its items' log-probabilities, teacher-forced through the
stock T5 decoder). For the model as evaluated (in fp32 only), also: each user's exact top-10 (`exact_top_k`, timed in
the same turns), how much of it a beam of `evaluate.beam_size` finds, with Recall / NDCG of the beam's lists and of the
exact ones; and each search's peak memory over one batch, each in a fresh process.
Prints a table and writes bench/results/beam_search_<dataset>[_<hand-run hash>][_bf16].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rastp import config
from rastp.beam_search import SidCatalogue, beam_search, exact_top_k, generate_top_k
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.evaluation import metric_means, per_user_metrics
from rastp.hardware import in_fresh_process, keep_freed_memory_for_reuse, peak_memory_mib, timed
from rastp.io import write_json
from rastp.training import SequenceBatches, length_order, load_model, make_examples

SEARCHES = ("beam_search", "generate")
ORDERS = ("length", "user")  # batches of like lengths (the evaluate stage's), or in the users' own order
PRECISIONS = ("32", "bf16")
SCORED_USERS_BATCH = 64  # users per teacher-forced scoring of their lists


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000, help="test users decoded by both searches (a fixed random "
                                                            "subset; 0: all)")
    ap.add_argument("--precision", choices=PRECISIONS, default="32", help="32: fp32, as the evaluate stage; bf16: "
                    "both searches under bf16 autocast")
    args, stage_args = ap.parse_known_args(argv)
    bf16 = args.precision == "bf16"
    kept_freed_memory = keep_freed_memory_for_reuse()  # run_stage has applied it already: this reads whether it took
    setup = load_setup(stage_args, args.users)
    model, catalogue, data, device = setup["model"], setup["catalogue"], setup["data"], setup["device"]
    as_evaluated = model.rastp.at_eval
    print(f"[bench] {setup['paths'].dataset}: {len(data)} test users in batches of {setup['batch_size']}, beam "
          f"{setup['beam_size']}, {len(catalogue)} items, {device}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if bf16 else 'fp32'}; the model prunes at test time: "
          f"{model.rastp.enabled and as_evaluated}", flush=True)

    settings = {}
    for at_eval in (as_evaluated, not as_evaluated):
        if at_eval != as_evaluated and not model.rastp.enabled:
            continue  # a model trained without pruning is the same either way
        model.rastp = dataclasses.replace(model.rastp, at_eval=at_eval)
        pruned = model.rastp.enabled and at_eval
        for order in ORDERS:
            name = f"{'pruned' if pruned else 'unpruned'}_{order}_order"
            settings[name] = compare(model, catalogue, batches_of(data, setup, order), setup, name, bf16=bf16,
                                     exact=at_eval == as_evaluated and order == "length" and not bf16)
            settings[name].update(pruned_at_test_time=pruned, as_evaluated=at_eval == as_evaluated, order=order)
    model.rastp = dataclasses.replace(model.rastp, at_eval=as_evaluated)
    memory = {search: peak_memory(search, stage_args, args.users, bf16) for search in SEARCHES}

    result = {
        "args": stage_args, "dataset": setup["paths"].dataset, "model": str(setup["model_path"]),
        "rastp": dataclasses.asdict(model.rastp), "beam_size": setup["beam_size"],
        "batch_size": setup["batch_size"], "users": len(data), "items": len(catalogue),
        "history_tokens": {"mean": round(float(np.mean(setup["lengths"])), 1), "max": int(np.max(setup["lengths"]))},
        "device": str(device), "threads": torch.get_num_threads(), "precision": "bf16 autocast" if bf16 else "fp32",
        "machine": platform.processor() or platform.machine(),
        "keep_freed_memory_for_reuse": kept_freed_memory, "settings": settings,
        "peak_memory_mib": memory,  # the model as evaluated, batches by length
        "memory_unit": "MiB peak allocated" if device.type == "cuda" else "MiB peak RSS increase",
    }
    write_json(f"bench/results/beam_search_{setup['paths'].result_name()}{'_bf16' if bf16 else ''}.json", result)

    print("\n| setting | beam_search users/s | generate users/s | speed-up | identical top-10 lists | differing: "
          "tied / ours higher / generate higher |\n|---|---|---|---|---|---|")
    for name, s in settings.items():
        d = s["differing_lists"]
        print(f"| {name} | {s['users_per_s']['beam_search']} | {s['users_per_s']['generate']} | {s['speedup']}x "
              f"| {s['identical_top10_lists']}/{len(data)} | {d['tied']} / {d['beam_search_scores_higher']} / "
              f"{d['generate_scores_higher']} |")
    main_setting = next(s for s in settings.values() if s["as_evaluated"] and s["order"] == "length")
    print(f"test metrics: {main_setting['test_metrics']}")
    if "exactness" in main_setting:
        print(f"exact top-10: {main_setting['exactness']}")
    print(f"peak memory ({result['memory_unit']}): {memory}")


def load_setup(stage_args: list[str], num_users: int) -> dict:
    """The trained model, its catalogue and the chosen users' test examples, as the evaluate stage has them."""
    cfg, paths = config.load(stage_args)
    evaluate = config.to_dict(cfg)["evaluate"]
    if evaluate["exclude_seen"]:
        raise config.ConfigError("evaluate.exclude_seen: generate cannot leave seen items out; compare under "
                                 "TIGER's protocol (false)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the evaluate stage
    model_path = paths.model() / "tiger.pt"
    model, vocab = load_model(model_path, map_location=device)
    sequences = load_prepared(paths.prepared()).sequences
    item_tokens = vocab.item_tokens(np.load(paths.sids() / "sids.npy"))
    catalogue = SidCatalogue(torch.from_numpy(item_tokens)).to(device)
    examples = make_examples(sequences, "test", int(cfg.tiger.max_history))
    users = np.arange(len(examples))
    if num_users and num_users < len(users):
        users = np.sort(np.random.default_rng(cfg.seed).choice(len(users), num_users, replace=False))
    data = SequenceBatches([examples[u] for u in users], item_tokens, vocab)
    lengths = [len(vocab.user_token(e.user)) + len(e.history) * vocab.sid_length for e in data.examples]
    return {"paths": paths, "model_path": model_path, "model": model, "catalogue": catalogue, "data": data,
            "lengths": lengths, "seed": cfg.seed, "batch_size": evaluate["batch_size"],
            "beam_size": evaluate["beam_size"], "top_k": max(evaluate["ks"]), "device": device}


def batches_of(data: SequenceBatches, setup: dict, order: str) -> list[dict]:
    sampler = length_order(data.examples) if order == "length" else range(len(data))
    return [{k: v.to(setup["device"]) for k, v in batch.items()}
            for batch in DataLoader(data, batch_size=setup["batch_size"], sampler=sampler, collate_fn=data.collate)]


def search_function(name: str, model, catalogue: SidCatalogue, beam_size: int, top_k: int, bf16: bool):
    """batch -> top_k items [B, top_k] by our beam search, our exact search or transformers' generate; `bf16`: under
    bf16 autocast."""
    if name in ("beam_search", "exact"):
        search = functools.partial(beam_search if name == "beam_search" else exact_top_k, beam_size=beam_size,
                                   top_k=top_k)
    else:
        search = functools.partial(generate_top_k, beam_size=beam_size, top_k=top_k)

    def run(batch: dict) -> torch.LongTensor:
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            found = search(model, batch["input_ids"], batch["attention_mask"], catalogue)
        return found if name == "generate" else found.items
    return run


def compare(model, catalogue: SidCatalogue, batches: list[dict], setup: dict, name: str, *, bf16: bool,
            exact: bool) -> dict:
    """Both searches (and with `exact` the exact search too) on the same batches, timed in turns, under bf16 autocast
    with `bf16`; their lists compared, the differing ones by the model's fp32 scores (`list_log_probs`)."""
    names = SEARCHES + (("exact",) if exact else ())
    searches = {search: search_function(search, model, catalogue, setup["beam_size"], setup["top_k"], bf16)
                for search in names}
    found = {search: [] for search in names}
    seconds = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for search in searches.values():  # warm-up, untimed
            search(batches[0])
        for batch in tqdm(batches, desc=name, unit="batch"):
            for search, run in searches.items():
                items, elapsed = timed(lambda: run(batch))
                found[search].append(items.cpu())
                seconds[search] += elapsed
    lists = {search: torch.cat(found[search]) for search in names}
    ours, theirs = lists["beam_search"], lists["generate"]
    targets = torch.cat([batch["target"].cpu() for batch in batches])
    users = len(targets)
    identical = (ours == theirs).all(dim=1)

    differ = (~identical).nonzero()[:, 0]
    list_log_prob = list_log_probs(model, catalogue, batches, differ,
                                   {"beam_search": ours[differ], "generate": theirs[differ]})
    margin = list_log_prob["beam_search"] - list_log_prob["generate"]
    tied = margin.abs().le(1e-4)  # the same items, or items the model scores alike to float precision
    result = {
        "seconds": {search: round(s, 2) for search, s in seconds.items()},
        "users_per_s": {search: round(users / s, 1) for search, s in seconds.items()},
        "speedup": round(seconds["generate"] / seconds["beam_search"], 2),
        "identical_top10_lists": int(identical.sum()),
        "same_top10_items": int(ours.sort(dim=1).values.eq(theirs.sort(dim=1).values).all(dim=1).sum()),
        "differing_lists": {"count": len(differ), "tied": int(tied.sum()),
                            "beam_search_scores_higher": int((~tied & (margin > 0)).sum()),
                            "generate_scores_higher": int((~tied & (margin < 0)).sum())},
        "short_lists": {search: int((items < 0).any(dim=1).sum()) for search, items in lists.items()},
        "test_metrics": {search: metric_means(per_user_metrics(items, targets, ks=(5, 10)))
                         for search, items in lists.items()},
    }
    if exact:
        result["exactness"] = {
            "users": users,
            "exact_search_cost": round(seconds["exact"] / seconds["beam_search"], 2),  # x the beam search's time
            "found_of_exact_top10": {search: round(overlap(lists[search], lists["exact"]), 4) for search in SEARCHES},
            "identical_to_exact": {search: int((lists[search] == lists["exact"]).all(dim=1).sum())
                                   for search in SEARCHES},
        }
    return result


@torch.inference_mode()
def list_log_probs(model, catalogue: SidCatalogue, batches: list[dict], rows: torch.LongTensor,
                   lists: dict[str, torch.LongTensor]) -> dict[str, torch.Tensor]:
    """Each list's log-probability [R] (the sum of its items'; -inf where it is short) for the given users (indices
    into the batches' rows), in fp32 and from the stock T5 decoder, teacher-forced on the items' SIDs: a judge that is
    neither search's own decoding. `lists`: name -> items [R, K]."""
    model.eval()
    width = max(batch["input_ids"].shape[1] for batch in batches)
    inputs = {key: torch.cat([pad_to(batch[key], width) for batch in batches])
              for key in ("input_ids", "attention_mask")}
    found = {name: [torch.empty(0)] for name in lists}
    for start in tqdm(range(0, len(rows), SCORED_USERS_BATCH), desc="scoring the differing lists", unit="batch"):
        chunk = slice(start, start + SCORED_USERS_BATCH)
        index = rows[chunk].to(inputs["input_ids"].device)
        hidden_states, mask = model.encode(inputs["input_ids"][index], inputs["attention_mask"][index])
        for name, items in lists.items():
            items = items[chunk].to(index.device)
            labels = catalogue.sid_tokens[items.clamp(min=0)].flatten(0, 1)  # [R * K, S]
            item_log_probs = model.sid_log_probs(hidden_states.repeat_interleave(items.shape[1], 0),
                                                 mask.repeat_interleave(items.shape[1], 0), labels).sum(1)
            item_log_probs = item_log_probs.view(items.shape)
            found[name].append(item_log_probs.masked_fill(items < 0, float("-inf")).sum(dim=1).cpu())
    return {name: torch.cat(parts) for name, parts in found.items()}


def pad_to(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad [B, T] with zeros (padding, masked) to [B, width]."""
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]))


def overlap(items: torch.LongTensor, reference: torch.LongTensor) -> float:
    """The mean fraction of each reference list's items that the list in `items` holds too."""
    return float((items[:, :, None] == reference[:, None, :]).any(dim=1).float().mean())


def peak_memory_child(search: str, stage_args: list[str], num_users: int, bf16: bool, threads: int, queue) -> None:
    """One batch of one search in a fresh process (the model as evaluated, the batch of the longest histories), so
    that its peak memory is its own."""
    keep_freed_memory_for_reuse()  # as in main, and in the stages
    torch.set_num_threads(threads)
    setup = load_setup(stage_args, num_users)
    catalogue = setup["catalogue"]
    catalogue.next_tokens, catalogue.item_of_sid  # noqa: B018 -- built once per catalogue, before measuring
    batch = batches_of(setup["data"], setup, "length")[-1]  # the longest histories
    run = search_function(search, setup["model"], catalogue, setup["beam_size"], setup["top_k"], bf16)
    with torch.inference_mode():
        queue.put(peak_memory_mib(lambda: run(batch), setup["device"]))


def peak_memory(search: str, stage_args: list[str], num_users: int, bf16: bool) -> float:
    return round(in_fresh_process(peak_memory_child, search, stage_args, num_users, bf16, torch.get_num_threads()), 1)


if __name__ == "__main__":
    run_stage(main)

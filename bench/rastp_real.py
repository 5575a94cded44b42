"""RASTP on real data: training speed, validation and test quality, pruning off vs on (and variants), side by side.

    python bench/rastp_real.py dataset=beauty train.max_steps=3000 [other overrides] [--eval-users 3000]

Takes the stage scripts' arguments: `dataset=<name>` and dotted overrides of params.yaml (the steps are
`train.max_steps`; `tiger.rastp.*` shapes the `on` variant). Needs the dataset's pipeline outputs up to `sids`
(`dvc repro sids@beauty` with beauty in `datasets`, or the hand runs of codebook and sids with the same overrides).
`--also keep_ratio=0.5` trains a further pruned variant beside `off` and `on` (its `tiger.rastp` fields changed from
`on`'s; repeatable). All models start from the same weights (same seed), see the same batches in the same order with
the same optimizer and schedule (params `train`), and their steps are interleaved one by one so that machine load hits
them alike. Then all are scored with the same beam search on the same users' validation targets (the split on which to
choose between pruning settings) and test targets; each pruned model also on test with the other `tiger.rastp.at_eval`
(pruning at test time or not). Training runs in `trainer.precision` as the train stage resolves it (`auto`:
bf16-mixed where the device has bf16, else 32-true; scoring in fp32). Prints a table, with each model's difference
from `off` on the same users and the standard error of that paired difference, and writes
bench/results/rastp_<dataset>[_<hand-run hash>][_malloc_defaults][_also_<variants>].json, with the process's page
faults, kernel time and peak memory. Like every stage, it keeps freed CPU memory for reuse
(`rastp.hardware.keep_freed_memory_for_reuse`); `RASTP_GLIBC_MALLOC_DEFAULTS=1` runs it on glibc's defaults instead
(the `_malloc_defaults` file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from rastp import config
from rastp.beam_search import SidCatalogue
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.evaluation import metric_means, per_user_metrics, rank_examples, standard_errors
from rastp.io import write_json
from rastp.tiger import RastpConfig, Tiger
from rastp.hardware import keep_freed_memory_for_reuse, resolve_precision, trainer_device
from rastp.training import SequenceBatches, SidVocabulary, make_examples, make_optimizer, model_kwargs, next_sid_loss


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-users", type=int, default=3000,
                    help="users scored on validation and test (a fixed random subset; 0: all)")
    ap.add_argument("--also", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                    help="a further pruned variant: tiger.rastp fields changed from `on`'s, e.g. keep_ratio=0.5 "
                         "(repeatable)")
    args, stage_args = ap.parse_known_args(argv)
    kept_freed_memory = keep_freed_memory_for_reuse()  # run_stage has applied it already: this reads whether it took
    also = {f"on[{spec}]": rastp_changes(spec) for spec in args.also}
    cfg, paths = config.load(stage_args)
    params = config.to_dict(cfg)
    seed, tiger_cfg, train_cfg = params["seed"], params["tiger"], params["train"]
    steps = train_cfg["max_steps"]
    if steps <= 0:
        raise config.ConfigError("bench/rastp_real.py needs train.max_steps > 0 (the steps of each variant)")
    device = trainer_device(params["trainer"]["accelerator"])
    precision = resolve_precision(params["trainer"]["precision"], params["trainer"]["accelerator"])
    if precision not in ("32-true", "bf16-mixed"):
        raise config.ConfigError(f"trainer.precision: bench/rastp_real.py trains in 32-true or bf16-mixed, "
                                 f"not {precision}")

    sequences = load_prepared(paths.prepared()).sequences
    sid_dir = paths.sids()
    vocab = SidVocabulary(tuple(json.loads((sid_dir / "levels.json").read_text())["level_sizes"]),
                          int(tiger_cfg["user_buckets"]))
    item_tokens = vocab.item_tokens(np.load(sid_dir / "sids.npy"))
    train = SequenceBatches(make_examples(sequences, "train", tiger_cfg["max_history"]), item_tokens, vocab)
    loader = DataLoader(train, batch_size=train_cfg["batch_size"], shuffle=True, collate_fn=train.collate,
                        generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    catalogue = SidCatalogue(torch.from_numpy(item_tokens)).to(device)

    kwargs = model_kwargs(tiger_cfg, vocab)
    variants = {"off": {**kwargs["rastp"], "enabled": False}, "on": {**kwargs["rastp"], "enabled": True}}
    variants.update({name: {**variants["on"], **changes} for name, changes in also.items()})
    models, optimizers, seconds = {}, {}, dict.fromkeys(variants, 0.0)
    for name, rastp in variants.items():
        torch.manual_seed(seed)
        models[name] = Tiger(**{**kwargs, "rastp": RastpConfig(**rastp)}).to(device)
        optimizers[name] = make_optimizer(models[name], train_cfg["optimizer"], lr=train_cfg["lr"],
                                          weight_decay=train_cfg["weight_decay"],
                                          warmup_steps=train_cfg["warmup_steps"], total_steps=steps,
                                          schedule=train_cfg["schedule"])
    print(f"[bench] {paths.dataset}: {len(train)} training examples, {steps} steps of {train_cfg['batch_size']}, "
          f"{device}, {precision}, {torch.get_num_threads()} threads, "
          f"pruning of the `on` variant: {tiger_cfg['rastp']}; further variants: {args.also}", flush=True)
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, model in models.items():
            optimizer, scheduler = optimizers[name]
            model.train()
            model.set_training_progress(step / steps)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = next_sid_loss(model, batch, catalogue)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
        if (step + 1) % 25 == 0:
            print(f"[bench] step {step + 1}: " + ", ".join(f"{n} {s:.0f}s" for n, s in seconds.items()), flush=True)

    # The same users for validation and test (one example each): a fixed random subset, or all.
    users = np.arange(len(sequences))
    if args.eval_users and args.eval_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(len(users), args.eval_users, replace=False))
    splits = {}
    for split in ("valid", "test"):
        examples = make_examples(sequences, split, tiger_cfg["max_history"])
        splits[split] = SequenceBatches([examples[u] for u in users], item_tokens, vocab)

    def score(model: Tiger, split: str, prune_at_eval: bool) -> dict[str, torch.Tensor]:
        model.rastp = dataclasses.replace(model.rastp, at_eval=prune_at_eval)
        rankings = rank_examples(model, splits[split], catalogue, beam_size=params["evaluate"]["beam_size"],
                                 batch_size=params["evaluate"]["batch_size"], top_k=10,
                                 exclude_seen=params["evaluate"]["exclude_seen"], device=device,
                                 exact=params["evaluate"]["exact"])
        return per_user_metrics(rankings.items, rankings.targets, ks=(5, 10))

    # Every model on validation and test as it was trained; each pruned one also on test with the other `at_eval`
    # (does pruning at test time match its training?).
    scored = {}
    for name, rastp in variants.items():
        scored[name] = (name, rastp["at_eval"])
        if rastp["enabled"]:
            scored[f"{name}_at_eval_{str(not rastp['at_eval']).lower()}"] = (name, not rastp["at_eval"])
    valid_per_user = {name: score(models[name], "valid", rastp["at_eval"]) for name, rastp in variants.items()}
    test_per_user = {key: score(models[name], "test", prune_at_eval) for key, (name, prune_at_eval) in scored.items()}
    validation = {name: metric_means(per_user) for name, per_user in valid_per_user.items()}
    quality = {key: metric_means(per_user) for key, per_user in test_per_user.items()}
    # Every model scores the same users, so a difference from `off` is judged by the spread of the per-user
    # differences (a paired standard error), far tighter than either mean's own.
    valid_minus_off = {name: minus(per_user, valid_per_user["off"])
                       for name, per_user in valid_per_user.items() if name != "off"}
    test_minus_off = {key: minus(per_user, test_per_user["off"])
                      for key, per_user in test_per_user.items() if key != "off"}

    examples = steps * train_cfg["batch_size"]
    result = {
        "args": stage_args, "dataset": paths.dataset, "steps": steps, "batch_size": train_cfg["batch_size"],
        "eval_users": len(users), "exclude_seen": params["evaluate"]["exclude_seen"],
        "exact": params["evaluate"]["exact"],
        "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rastp_on": variants["on"],  # `off` is the same model unpruned
        "rastp_also": {name: rastp for name, rastp in variants.items() if name not in ("off", "on")},
        "train_seconds": {n: round(s, 1) for n, s in seconds.items()},
        "examples_per_s": {n: round(examples / s, 1) for n, s in seconds.items()},
        "speedup": round(seconds["off"] / seconds["on"], 3),
        "speedups": {n: round(seconds["off"] / s, 3) for n, s in seconds.items() if n != "off"},
        "valid": validation,
        "test": quality,
        "valid_minus_off": valid_minus_off,
        "test_minus_off": test_minus_off,
        "process": process_figures(kept_freed_memory),
    }
    suffix = ("" if kept_freed_memory else "_malloc_defaults") + "".join(
        "_also_" + "".join(spec.split()).replace("=", "-").replace(",", "_") for spec in args.also)
    write_json(f"bench/results/rastp_{paths.result_name()}{suffix}.json", result)
    print("\n| pruning | train s | examples/s | speed-up | val R@10 | val N@10 | val N@10 - off | R@5 | N@5 | R@10 "
          "| N@10 | N@10 - off |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, (name, prune_at_eval) in scored.items():
        q, v = quality[key], validation[name]
        val = " | | "
        if prune_at_eval == variants[name]["at_eval"]:
            val = f"{v['recall@10']:.4f} | {v['ndcg@10']:.4f} | {difference(valid_minus_off.get(name))}"
        print(f"| {key} | {seconds[name]:.0f} | {examples / seconds[name]:.1f} | {seconds['off'] / seconds[name]:.2f}x "
              f"| {val} | {q['recall@5']:.4f} | {q['ndcg@5']:.4f} | {q['recall@10']:.4f} | {q['ndcg@10']:.4f} "
              f"| {difference(test_minus_off.get(key))} |")


def process_figures(kept_freed_memory: bool) -> dict:
    """The whole run's CPU memory traffic (training and scoring): the allocator's setting, the page faults, the
    kernel's time and the peak resident memory."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"keep_freed_memory_for_reuse": kept_freed_memory, "minor_page_faults": usage.ru_minflt,
            "system_s": round(usage.ru_stime, 1), "user_s": round(usage.ru_utime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # ru_maxrss: KiB on Linux


def minus(per_user: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Each metric's mean per-user difference from `reference` (the same users) and its standard error."""
    differences = {name: per_user[name] - reference[name] for name in per_user}
    errors = standard_errors(differences)
    return {name: {"mean": round(float(values.mean()), 5), "standard_error": errors[name]}
            for name, values in differences.items()}


def difference(minus_off: dict | None) -> str:
    """NDCG@10's difference from `off`, `+0.0002 ± 0.0003` (blank for `off` itself)."""
    if minus_off is None:
        return ""
    ndcg = minus_off["ndcg@10"]
    return f"{ndcg['mean']:+.4f} ± {ndcg['standard_error'] or 0:.4f}"


def rastp_changes(spec: str) -> dict:
    """`keep_ratio=0.5,prune_layer=3` -> {"keep_ratio": 0.5, "prune_layer": 3}: `tiger.rastp` overrides, parsed and
    type-checked against params.yaml's schema as any other override."""
    fields = [item.partition("=")[0].strip() for item in spec.split(",")]
    if "enabled" in fields:
        raise config.ConfigError(f"--also {spec!r}: a further variant is pruned; `enabled` is not one of its fields")
    rastp = config.compose_params([f"tiger.rastp.{item.strip()}" for item in spec.split(",")]).tiger.rastp
    return {field: rastp[field] for field in fields}


if __name__ == "__main__":
    run_stage(main)

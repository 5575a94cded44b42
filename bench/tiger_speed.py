"""Benchmark TIGER + RASTP side by side in one process, on synthetic inputs of Amazon Beauty's shape (not a test).

    python bench/tiger_speed.py [--batch-size 256 --train-steps 5 --eval-users 128 --beam-size 20]

Synthetic data: 12,101 items with random 3 x 256 SIDs + a de-duplication code, histories of 20 items (80 tokens)
after 1 user token, batch 256: the shapes of Beauty, no signal. Everything runs with the same seed and data.
1. training speed, RASTP off vs on (target: on >= 1.36x faster). Quality (test NDCG@10 of both) needs real Beauty
   data and full training runs, which this script does not do
2. evaluation: our beam search vs `t5.generate(num_beams, prefix_allowed_tokens_fn)` on the same model and users:
   same top-10 lists, users/s (target >= 5x faster)
3. wrapper overhead: a Tiger training step vs a stock T5ForConditionalGeneration step of the same sizes (no slower),
   and Tiger with torch's dropout vs its packed dropout (the same model otherwise; the gain is CPU-only)
   Also stock T5, Tiger and RASTP under bf16 autocast (`trainer.precision=bf16-mixed`) against fp32, on CPU or GPU
   alike, and in bf16 Tiger with transformers' SDPA attention vs its own (`tiger_attention`, which differs on CPU)
   and with T5's feed-forward vs its own (`FeedForward`, which skips a bf16 -> fp32 -> bf16 round trip)
4. peak memory of training and evaluation, each in a fresh process (CUDA: peak allocated; CPU: peak RSS increase)
Like the stages, it keeps freed CPU memory for reuse (`rastp.hardware.keep_freed_memory_for_reuse`; recorded in the
JSON); `RASTP_GLIBC_MALLOC_DEFAULTS=1` runs it on glibc's defaults.
Prints a table and writes bench/results/tiger_speed.json.
"""

from __future__ import annotations

import argparse
import platform

import torch
import yaml
from transformers.models.t5.modeling_t5 import T5DenseActDense

from rastp.beam_search import SidCatalogue, beam_search, generate_top_k
from rastp.hardware import in_fresh_process, keep_freed_memory_for_reuse, peak_memory_mib, timed
from rastp.io import write_json
from rastp.tiger import Tiger

ITEMS, LEVELS, CODES, DEDUP, USER_BUCKETS, HISTORY = 12_101, 3, 256, 256, 2000, 20
SID_LENGTH = LEVELS + 1
VOCAB = 1 + LEVELS * CODES + DEDUP + USER_BUCKETS  # the lead's layout: pad, level codes, dedup codes, user tokens


def synthetic_catalogue(generator: torch.Generator) -> torch.Tensor:
    """[ITEMS, 4] token ids: random codes per level; the dedup code numbers the items sharing a 3-code prefix."""
    codes = torch.randint(CODES, (ITEMS, LEVELS), generator=generator)
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)
    first = torch.searchsorted(group[order], group[order])  # first index of each item's group in sorted order
    dedup = torch.empty_like(group)
    dedup[order] = torch.arange(ITEMS) - first
    sids = torch.cat([codes, dedup[:, None]], dim=1)
    return 1 + torch.arange(SID_LENGTH) * CODES + sids


def synthetic_batch(sid_tokens: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    items = torch.randint(ITEMS, (batch_size, HISTORY + 1), generator=generator)
    users = 1 + LEVELS * CODES + DEDUP + torch.randint(USER_BUCKETS, (batch_size, 1), generator=generator)
    input_ids = torch.cat([users, sid_tokens[items[:, :-1]].flatten(1)], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": sid_tokens[items[:, -1]]}


def build(variant: str, tiger_params: dict, seed: int) -> torch.nn.Module:
    """`stock`: T5ForConditionalGeneration alone (torch's dropout, transformers' SDPA attention, T5's feed-forward);
    `tiger`: pruning off; `tiger_torch_dropout`: the same with torch's dropout instead of the packed one; `tiger_sdpa`:
    the same with transformers' SDPA attention instead of `tiger_attention`; `tiger_t5_feed_forward`: the same with
    T5's feed-forward instead of `rastp.tiger.FeedForward`; `rastp`: pruning on (params' settings); a `_bf16` suffix:
    the same model, trained under bf16 autocast (`train_step`). Every variant scores with the vocabulary softmax, the
    one `generate` has."""
    variant = variant.removesuffix("_bf16")
    sizes = {k: tiger_params[k] for k in ("num_layers", "num_decoder_layers", "d_model", "num_heads", "d_kv", "d_ff",
                                          "dropout", "tie_embeddings")}
    rastp = {**tiger_params["rastp"], "enabled": variant == "rastp"}
    torch.manual_seed(seed)
    model = Tiger(vocab_size=VOCAB, sid_length=SID_LENGTH, **sizes, rastp=rastp,
                  max_input_length=1 + HISTORY * SID_LENGTH,  # a user token and HISTORY items
                  packed_dropout=variant not in ("stock", "tiger_torch_dropout"))
    if variant in ("stock", "tiger_sdpa"):
        model.t5.set_attn_implementation("sdpa")
    if variant in ("stock", "tiger_t5_feed_forward"):
        for block in (*model.t5.encoder.block, *model.t5.decoder.block):
            ours, stock = block.layer[-1].DenseReluDense, T5DenseActDense(model.t5.config)
            stock.wi, stock.dropout, stock.wo = ours.wi, ours.dropout, ours.wo  # the same modules, T5's forward
            block.layer[-1].DenseReluDense = stock
    return model.t5 if variant == "stock" else model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool) -> None:
    """One step; `bf16`: forward under bf16 autocast with fp32 weights, as Lightning's bf16-mixed."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch) if isinstance(model, Tiger) else model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_memory_child(task: str, args: dict, queue) -> None:
    """One task in a fresh process, so that peak memory is its own."""
    keep_freed_memory_for_reuse()  # as in main, and in the stages
    torch.set_num_threads(args["threads"])
    generator = torch.Generator().manual_seed(args["seed"])
    sid_tokens = synthetic_catalogue(generator)
    kind, variant = task.split("-")
    if kind == "train":
        model = build(variant, args["tiger"], args["seed"]).train()
        batch = synthetic_batch(sid_tokens, args["batch_size"], generator)
        optimizer = torch.optim.AdamW(model.parameters())
        run = lambda: train_step(model, optimizer, batch, variant.endswith("_bf16"))  # noqa: E731
    else:
        model = build("tiger", args["tiger"], args["seed"]).eval()
        batch = synthetic_batch(sid_tokens, args["eval_users"], generator)
        catalogue = SidCatalogue(sid_tokens)
        run = {"beam": lambda: beam_search(model, batch["input_ids"], batch["attention_mask"], catalogue,
                                           beam_size=args["beam_size"], top_k=10),
               "generate": lambda: generate_top_k(model, batch["input_ids"], batch["attention_mask"], catalogue,
                                                  beam_size=args["beam_size"], top_k=10)}[variant]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode(kind == "eval"):
        queue.put(peak_memory_mib(run, device))


def peak_memory(task: str, args: dict) -> float:
    return round(in_fresh_process(peak_memory_child, task, args), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per variant, after one warm-up step")
    ap.add_argument("--eval-users", type=int, default=128)
    ap.add_argument("--beam-size", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml `seed`")
    ap.add_argument("--dropout", type=float, default=0.1,
                    help="every variant's dropout (default: the paper's TIGER; the packed-dropout comparison needs it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a loaded machine)")
    ap.add_argument("--out", default="bench/results/tiger_speed.json")
    args = ap.parse_args()
    kept_freed_memory = keep_freed_memory_for_reuse()  # as the stages do (rastp.cli.run_stage)
    if args.beam_size < 10:
        ap.error("--beam-size must be at least 10: generate returns one top-10 list per user from its beams")
    if args.threads:
        torch.set_num_threads(args.threads)

    params = yaml.safe_load(open(args.params))
    params["tiger"]["dropout"] = args.dropout
    seed = params["seed"] if args.seed is None else args.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(seed)
    sid_tokens = synthetic_catalogue(generator)
    batches = [{k: v.to(device) for k, v in synthetic_batch(sid_tokens, args.batch_size, generator).items()}
               for _ in range(args.train_steps + 1)]
    rastp_cfg = {**params["tiger"]["rastp"], "enabled": True}  # the `rastp` variant's settings
    print(f"[bench] {device}, {torch.get_num_threads()} threads; rastp {rastp_cfg}")

    # 1 + 3: training steps, the variants interleaved step by step so that machine load hits them alike.
    variants = ["stock", "tiger_torch_dropout", "tiger", "rastp", "stock_bf16", "tiger_sdpa_bf16",
                "tiger_t5_feed_forward_bf16", "tiger_bf16", "rastp_bf16"]
    models = {v: build(v, params["tiger"], seed).to(device).train() for v in variants}
    optimizers = {v: torch.optim.AdamW(m.parameters()) for v, m in models.items()}
    seconds = dict.fromkeys(variants, 0.0)
    for step, batch in enumerate(batches):
        for v in variants:
            _, elapsed = timed(lambda: train_step(models[v], optimizers[v], batch, v.endswith("_bf16")))
            seconds[v] += elapsed if step > 0 else 0.0  # step 0 warms up
            print(f"[bench] train {v} step {step}: {elapsed:.2f}s")
    examples = args.batch_size * args.train_steps
    train = {v: {"seconds": round(s, 2), "examples_per_s": round(examples / s, 1)} for v, s in seconds.items()}

    # 2: evaluation on the same model (the trained `tiger` variant) and users.
    model = models["tiger"].eval()
    catalogue = SidCatalogue(sid_tokens).to(device)
    users = {k: v[: args.eval_users] for k, v in batches[0].items()}
    with torch.inference_mode():
        ours, ours_s = timed(lambda: beam_search(model, users["input_ids"], users["attention_mask"], catalogue,
                                                 beam_size=args.beam_size, top_k=10))
        hf_items, hf_s = timed(lambda: generate_top_k(model, users["input_ids"], users["attention_mask"], catalogue,
                                                      beam_size=args.beam_size, top_k=10))
    same_lists = int((ours.items == hf_items).all(dim=1).sum())
    same_sets = sum(set(a) == set(b) for a, b in zip(ours.items.tolist(), hf_items.tolist()))
    n_users = len(users["input_ids"])
    evaluation = {"users": n_users, "beam_size": args.beam_size, "ours_seconds": round(ours_s, 2),
                  "generate_seconds": round(hf_s, 2), "ours_users_per_s": round(n_users / ours_s, 1),
                  "generate_users_per_s": round(n_users / hf_s, 1), "identical_top10_lists": same_lists,
                  "identical_top10_sets": same_sets, "ours_short_lists": ours.num_short}

    # 4: peak memory, each task in its own process.
    child_args = {"tiger": params["tiger"], "seed": seed, "batch_size": args.batch_size, "eval_users": args.eval_users,
                  "beam_size": args.beam_size, "threads": torch.get_num_threads()}
    memory = {task: peak_memory(task, child_args)
              for task in [f"train-{v}" for v in variants] + ["eval-beam", "eval-generate"]}

    ratios = {"rastp_speedup": round(seconds["tiger"] / seconds["rastp"], 3),
              "tiger_vs_stock_step_time": round(seconds["tiger"] / seconds["stock"], 3),
              "tiger_vs_stock_step_time_bf16": round(seconds["tiger_bf16"] / seconds["stock_bf16"], 3),
              "tiger_attention_speedup_bf16": round(seconds["tiger_sdpa_bf16"] / seconds["tiger_bf16"], 3),
              "feed_forward_speedup_bf16": round(seconds["tiger_t5_feed_forward_bf16"] / seconds["tiger_bf16"], 3),
              "packed_dropout_speedup": round(seconds["tiger_torch_dropout"] / seconds["tiger"], 3),
              "bf16_speedup_tiger": round(seconds["tiger"] / seconds["tiger_bf16"], 3),
              "bf16_speedup_rastp": round(seconds["rastp"] / seconds["rastp_bf16"], 3),
              "rastp_speedup_bf16": round(seconds["tiger_bf16"] / seconds["rastp_bf16"], 3),
              "beam_search_speedup_vs_generate": round(hf_s / ours_s, 2)}
    unit = "MiB peak allocated" if device.type == "cuda" else "MiB peak RSS increase"
    width = batches[0]["input_ids"].shape[1]
    print(f"\nsynthetic Beauty shapes: {ITEMS} items, SID {SID_LENGTH} tokens, input {width} tokens, batch "
          f"{args.batch_size}, {args.train_steps} timed steps; {device}, {torch.get_num_threads()} threads")
    print(f"{'training':<22} {'seconds':>8} {'examples/s':>11} {unit:>24}")
    for v in variants:
        print(f"{v:<22} {train[v]['seconds']:>8.2f} {train[v]['examples_per_s']:>11.1f} {memory['train-' + v]:>24.1f}")
    print(f"{'evaluation':<22} {'seconds':>8} {'users/s':>11}")
    print(f"{'our beam search':<22} {ours_s:>8.2f} {n_users / ours_s:>11.1f} {memory['eval-beam']:>24.1f}")
    print(f"{'t5.generate':<22} {hf_s:>8.2f} {n_users / hf_s:>11.1f} {memory['eval-generate']:>24.1f}")
    print(f"top-10 identical to generate: {same_lists}/{n_users} lists ({same_sets}/{n_users} as sets)")
    for name, value in ratios.items():
        print(f"{name}: {value}")

    write_json(args.out, {"seed": seed, "dropout": args.dropout, "device": str(device),
                          "threads": torch.get_num_threads(), "machine": platform.machine(),
                          "batch_size": args.batch_size,
                          "train_steps": args.train_steps, "rastp": rastp_cfg, "train": train,
                          "evaluation": evaluation, "peak_memory_mib": memory, "memory_unit": unit,
                          "ratios": ratios, "keep_freed_memory_for_reuse": kept_freed_memory})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

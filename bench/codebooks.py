"""Benchmark every semantic-ID tokenizer side by side on one dataset's item embeddings (not a test).

    python bench/codebooks.py --embeddings data/embeddings/beauty.npy [--set codebook.epochs=50 ...]

Each method runs with the `codebook` params of params.yaml (plus --set overrides) and only its
method switched. Prints a table and writes bench/results/codebooks.json. `unique` is the fraction of items
whose L codes no other item has, with the params' `codebook.last_level`; `nearest` the same with every level
at its nearest code (what the quantizer alone achieves).
Issue targets (Beauty, MiniLM, 3 x 256): RQ-VAE unique fraction >= 0.95, usage >= 90% per level,
every method <= 2 minutes of training on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from rastp.io import write_json
from rastp.quantizers import fit_codebook

VARIANTS = {
    "rqvae-ste": {"method": "rqvae", "rqvae.quantize": "ste"},
    "rqvae-gumbel": {"method": "rqvae", "rqvae.quantize": "gumbel"},
    "rqkmeans": {"method": "rqkmeans"},
    "rvq": {"method": "rvq"},
}


def with_overrides(cfg: dict, overrides: dict) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(cfg))  # deep copy
    for key, value in overrides.items():
        node, *path = cfg, *key.split(".")
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return cfg


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("codebook."):
            sys.exit(f"--set expects codebook.<key>=<value>, got {item!r}")
        out[key.removeprefix("codebook.")] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="beauty", help="whose `codebook_size` to use (and default embeddings)")
    ap.add_argument("--embeddings", default=None, help="[items, dim] .npy file (default: data/embeddings/<dataset>.npy)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="codebook.KEY=VALUE", help="override a param")
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml `seed`")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default="bench/results/codebooks.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = yaml.safe_load(Path(args.params).read_text())
    args.embeddings = args.embeddings or f"data/embeddings/{args.dataset}.npy"
    base = with_overrides({**params["codebook"], "codebook_size": params["codebook_size"][args.dataset]},
                          parse_set(args.set))
    seed = params["seed"] if args.seed is None else args.seed
    embeddings = np.load(args.embeddings)
    trainer = {"accelerator": "auto", "devices": 1, "precision": "32-true"}

    results = {}
    for name in args.methods:
        cfg = with_overrides(base, VARIANTS[name])
        result = fit_codebook(embeddings, cfg, seed=seed, trainer=trainer, source=args.embeddings)
        results[name] = result.report
        print(f"[bench] {name}: {result.report['train_seconds']:.1f}s", file=sys.stderr)

    header = f"{'method':<13} {'unique':>7} {'nearest':>7} {'distinct':>8} {'largest':>7} {'usage/level':>17} {'perplexity/level':>20} {'recon_mse':>10} {'train_s':>8}"
    print(f"\n{args.embeddings}: {embeddings.shape[0]} items x {embeddings.shape[1]}, "
          f"{base['levels']} levels x {base['codebook_size']} codes, {torch.get_num_threads()} threads")
    print(header)
    for name, r in results.items():
        usage = "/".join(f"{u:.2f}" for u in r["usage"])
        ppl = "/".join(f"{p:.0f}" for p in r["perplexity"])
        print(f"{name:<13} {r['unique_fraction']:>7.4f} {r['unique_fraction_nearest']:>7.4f} {r['distinct_fraction']:>8.4f} {r['largest_collision_group']:>7d} "
              f"{usage:>17} {ppl:>20} {r['recon_mse']:>10.6f} {r['train_seconds']:>8.1f}")

    write_json(args.out, {"embeddings": args.embeddings, "shape": list(embeddings.shape), "seed": seed,
                          "codebook": base, "threads": torch.get_num_threads(), "machine": platform.machine(),
                          "cuda": torch.cuda.is_available(), "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Stage codebook: embeddings -> a trained residual quantizer, its codes and quality report."""

import csv

import numpy as np
import torch

from rastp import config
from rastp.cli import run_stage
from rastp.io import atomic_path, read_npy, write_json
from rastp.quantizers import fit_codebook


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # rows may log different terms
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def usage_table(usage_rows):
    """Long rows (level, code, count) -> one row per code with a count column per level, for `dvc plots`."""
    table = {}
    for row in usage_rows:
        table.setdefault(row["code"], {"code": row["code"]})[f"level_{row['level'] + 1}"] = row["count"]
    return [table[code] for code in sorted(table)]


def main(argv):
    cfg, paths = config.load(argv)
    source = paths.embeddings()
    embeddings = read_npy(source)
    codebook_cfg = {**config.to_dict(cfg.codebook), "codebook_size": cfg.codebook_size[paths.dataset]}
    result = fit_codebook(embeddings, codebook_cfg, seed=cfg.seed,
                          trainer=config.to_dict(cfg.trainer), source=str(source))
    with atomic_path(paths.codebook(write=True), directory=True) as tmp:
        torch.save(result.state, tmp / "quantizer.pt")
        np.save(tmp / "codes.npy", result.codes)
        if result.history:
            write_csv(tmp / "history.csv", result.history)
    write_json(paths.metrics("codebook"), result.report)
    with atomic_path(paths.metrics("codebook").with_name(f"{paths.dataset}-usage.csv")) as tmp:
        write_csv(tmp, usage_table(result.usage_rows))
    print(f"[codebook] {paths.dataset}: unique fraction {result.report['unique_fraction']:.4f}, "
          f"usage {result.report['usage']}, recon mse {result.report['recon_mse']:.5f}")


if __name__ == "__main__":
    run_stage(main)

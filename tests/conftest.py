"""Shared fixtures: a tiny MovieLens-format dataset and a throw-away copy of the pipeline repo."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def write_tiny_movielens(folder: Path, users: int = 30, items: int = 40, length: int = 10, seed: int = 0) -> None:
    """RecBole-format .inter/.item files: each user walks the items of one genre in a fixed cycle,
    so the next item is predictable from the history (a model can beat popularity)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre_items = {g: [i for i in range(1, items + 1) if i % len(GENRES) == n] for n, g in enumerate(GENRES)}
    with open(folder / "ml-100k.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, items + 1):
            genre = GENRES[i % len(GENRES)]
            f.write(f"{i}\t{genre} Movie number {i}\t{1990 + i % 7}\t{genre}\n")
    with open(folder / "ml-100k.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(1, users + 1):
            cycle = genre_items[GENRES[u % len(GENRES)]]
            start = rng.randrange(len(cycle))
            for t in range(length):
                f.write(f"{u}\t{cycle[(start + t) % len(cycle)]}\t4\t{880000000 + 1000 * t + u}\n")


# Small enough for 2 CPU cores: every stage runs for real, on tiny sizes.
TINY_PARAMS = {
    "datasets": ["tiny"],
    "data.tiny": {"source": "movielens", "min_user_interactions": 5,
                  "text_template": "Title: {title}; Year: {year}; Genres: {genres}"},
    "embed.batch_size": 64,
    "codebook.levels": 2,
    "codebook_size.tiny": 8,
    "codebook.epochs": 20,
    "codebook.batch_size": 64,
    "sids.dedup_size": 40,  # a collapsed tiny codebook must not stop the run
    "tiger.user_buckets": 16,
    "tiger.num_layers": 2,
    "tiger.num_decoder_layers": 1,
    "tiger.d_model": 32,
    "tiger.num_heads": 2,
    "tiger.d_kv": 16,
    "tiger.d_ff": 64,
    "train.batch_size": 32,
    "train.max_epochs": 3,
    "train.max_steps": -1,
    "train.val_every_steps": 0,
    "train.warmup_steps": 5,
    "train.lr": 0.005,
    "evaluate.beam_size": 10,
    "evaluate.batch_size": 16,
}


def set_params(params_file: Path, updates: dict) -> None:
    """Set dotted keys in a params.yaml (the same keys as `dvc exp run -S`)."""
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # DVC runs each stage's `python ...` from PATH: make it this interpreter.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def make_pipeline_repo(dest: Path) -> Path:
    """A git + DVC repo holding this project's pipeline (dvc.yaml, params.yaml, stages/, src/)
    and the tiny dataset (tracked by DVC), committed: a stand-in for a fresh clone."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(dest / "params.yaml", TINY_PARAMS)
    write_tiny_movielens(dest / "data/raw/tiny")
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], dest)
    # DVC's per-machine state (hashes, indexes; /var/tmp/dvc by default) is keyed by the repo's path, which pytest
    # reuses across runs: keep this repo's state beside it, fresh each time.
    run([sys.executable, "-m", "dvc", "config", "core.site_cache_dir", str(dest.parent / f"{dest.name}-dvc-state")], dest)
    run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/tiny"], dest)  # raw data is DVC's, as for Amazon
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "pipeline with a tiny dataset"], dest)
    return dest


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    return make_pipeline_repo(tmp_path_factory.mktemp("repo"))

"""Stage scripts on bad input: a clear error naming the file or param, exit code 2, no output."""

from __future__ import annotations

import runpy
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_PARAMS, set_params, write_tiny_movielens


@pytest.fixture
def repo(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path / "params.yaml", TINY_PARAMS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(name: str, *args: str, monkeypatch, capsys) -> str:
    """Run stages/<name>.py as DVC would; assert it fails with exit code 2; return its stderr."""
    monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="__main__")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_raw_file(repo, monkeypatch, capsys):
    write_tiny_movielens(repo / "data/raw/tiny")
    (repo / "data/raw/tiny/ml-100k.item").unlink()
    err = run_stage("prepare", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "data/raw/tiny/ml-100k.item: file not found" in err
    assert not (repo / "data/prepared").exists()


def test_malformed_raw_file(repo, monkeypatch, capsys):
    write_tiny_movielens(repo / "data/raw/tiny")
    with open(repo / "data/raw/tiny/ml-100k.inter", "a") as f:
        f.write("3\tnot-a-number\t4\t5\n")
    err = run_stage("prepare", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "data/raw/tiny/ml-100k.inter:302:" in err
    assert not (repo / "data/prepared").exists()


def test_unknown_dataset(repo, monkeypatch, capsys):
    err = run_stage("prepare", "dataset=netflix", monkeypatch=monkeypatch, capsys=capsys)
    assert "unknown dataset 'netflix'" in err


def test_missing_input_of_a_later_stage(repo, monkeypatch, capsys):
    err = run_stage("codebook", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "data/embeddings/tiny.npy" in err and not (repo / "data/codebook").exists()


def test_embedding_model_that_cannot_be_loaded_offline(repo, monkeypatch, capsys):
    write_tiny_movielens(repo / "data/raw/tiny")
    runpy.run_path(str(REPO / "stages/prepare.py"), run_name="not-main")["main"](["dataset=tiny"])
    set_params(repo / "params.yaml", {"embed.model": "no-such-org/no-such-encoder"})
    err = run_stage("embed", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "embed.model='no-such-org/no-such-encoder' cannot be loaded offline" in err
    assert not (repo / "data/embeddings").exists()


def test_embedding_width_disagrees_with_codebook_params(repo, monkeypatch, capsys):
    (repo / "data/embeddings").mkdir(parents=True)
    np.save(repo / "data/embeddings/tiny.npy", np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32))
    err = run_stage("codebook", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "codebook.input_dim" in err and "16" in err
    assert not (repo / "data/codebook").exists() and not (repo / "metrics").exists()


def test_collision_group_too_large(repo, monkeypatch, capsys):
    (repo / "data/codebook/tiny").mkdir(parents=True)
    codes = np.zeros((40, 2), dtype=np.int64)
    codes[:9] = [1, 2]  # nine items share one code tuple
    codes[9:, 0] = np.arange(31) % 8
    codes[9:, 1] = np.arange(31) // 8 + 4  # every other tuple is unique
    np.save(repo / "data/codebook/tiny/codes.npy", codes)
    set_params(repo / "params.yaml", {"sids.dedup_size": 8})
    err = run_stage("sids", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "9 items share the codes [1, 2]" in err and "sids.dedup_size=8" in err
    assert not (repo / "data/sids").exists() and not (repo / "metrics").exists()


def test_param_of_the_wrong_type(repo, monkeypatch, capsys):
    write_tiny_movielens(repo / "data/raw/tiny")
    err = run_stage("prepare", "dataset=tiny", "tiger.rastp.enabled=maybe", monkeypatch=monkeypatch, capsys=capsys)
    assert "tiger.rastp.enabled: Value 'maybe' is not a valid bool" in err
    assert not (repo / "runs").exists() and not (repo / "data/prepared").exists()


def test_bad_param_of_a_hand_run_leaves_no_empty_run_folders(repo, monkeypatch, capsys):
    write_tiny_movielens(repo / "data/raw/tiny")
    runpy.run_path(str(REPO / "stages/prepare.py"), run_name="not-main")["main"](["dataset=tiny"])
    (repo / "data/codebook/tiny").mkdir(parents=True)
    np.save(repo / "data/codebook/tiny/codes.npy", np.stack([np.arange(40) // 8, np.arange(40) % 8], axis=1))
    runpy.run_path(str(REPO / "stages/sids.py"), run_name="not-main")["main"](["dataset=tiny"])
    # the value is checked when the model is built, after the stage has made its output folders
    err = run_stage("train", "dataset=tiny", "tiger.rastp.until=2", monkeypatch=monkeypatch, capsys=capsys)
    assert "tiger.rastp.until: 2.0 is not in [0, 1]" in err
    assert not (repo / "runs").exists()
    assert (repo / "data/sids/tiny/sids.npy").exists()  # what was there before is left alone


def test_an_unreadable_array_input_is_named(repo, monkeypatch, capsys):
    (repo / "data/codebook/tiny").mkdir(parents=True)
    np.save(repo / "data/codebook/tiny/codes.npy", np.array([{"not": "codes"}], dtype=object))  # pickled objects
    err = run_stage("sids", "dataset=tiny", monkeypatch=monkeypatch, capsys=capsys)
    assert "data/codebook/tiny/codes.npy: not a readable .npy array" in err
    assert not (repo / "data/sids").exists() and not (repo / "metrics").exists()


def test_a_dataset_without_codes_per_level_or_with_no_history_is_refused(repo, monkeypatch, capsys):
    set_params(repo / "params.yaml", {"data.games": {"source": "amazon", "category": "Video_Games",
                                                     "min_user_interactions": 5, "text_template": "{title}"}})
    err = run_stage("codebook", "dataset=games", monkeypatch=monkeypatch, capsys=capsys)
    assert "codebook_size: no entry for dataset 'games'" in err
    err = run_stage("train", "dataset=tiny", "tiger.max_history=0", monkeypatch=monkeypatch, capsys=capsys)
    assert "tiger.max_history: 0 must be at least 1" in err
    assert not (repo / "runs").exists() and not (repo / "data/codebook").exists()

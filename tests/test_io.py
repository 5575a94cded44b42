"""Atomic outputs: a failed block leaves neither its output nor the folders made for it."""

from __future__ import annotations

import pytest

from rastp.io import atomic_path


def test_failed_block_removes_the_folders_it_made_and_nothing_else(tmp_path):
    (tmp_path / "runs").mkdir()  # existed before: stays, though empty
    (tmp_path / "runs/metrics").mkdir()
    (tmp_path / "runs/metrics/other.json").write_text("{}")  # another output: its folder stays
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "runs/x/data/models/tiny", directory=True) as model, \
                atomic_path(tmp_path / "runs/metrics/train/tiny", directory=True) as live:
            (model / "tiger.pt").write_bytes(b"partial")
            (live / "curve.tsv").write_text("step\tloss\n")
            raise RuntimeError("bad param")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "runs", "runs/metrics", "runs/metrics/other.json"]


def test_successful_block_moves_its_output_into_place(tmp_path):
    with atomic_path(tmp_path / "a/b/out.txt") as out:
        out.write_text("done")
    assert (tmp_path / "a/b/out.txt").read_text() == "done"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["out.txt"]  # no temporary sibling left

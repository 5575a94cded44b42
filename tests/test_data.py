"""The prepare stage's common logic and the MovieLens reader."""

import json
import runpy
import shutil

import pytest

import rastp.data.movielens
from conftest import REPO, write_tiny_movielens
from rastp.data import RawDataset, load_prepared, render_text, split_user, write_prepared
from rastp.data.movielens import read_movielens
from rastp.io import DataError

TEMPLATE = "Title: {title}; Year: {year}; Genres: {genres}"


def test_render_text_drops_segments_with_missing_fields():
    assert render_text(TEMPLATE, {"title": "Heat", "year": "", "genres": ["Crime", "Drama"]}) == \
        "Title: Heat; Genres: Crime, Drama"
    assert render_text(TEMPLATE, {"title": "  Two\n lines ", "year": 1995}) == "Title: Two lines; Year: 1995"
    assert render_text(TEMPLATE, {}) == ""


def test_movielens_orders_by_timestamp_then_item_id(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                     "1\tA\t1990\tDrama\n2\tB\t1991\tComedy Drama\n10\tC\t1992\tHorror\n")
    (raw / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                      "7\t10\t3\t50\n7\t2\t3\t50\n7\t1\t5\t10\n8\t1\t1\t5\n")
    data = read_movielens(raw)
    assert data.sequences == {"7": ["1", "2", "10"], "8": ["1"]}  # the tie at t=50: item 2 before 10
    assert data.item_fields["2"] == {"title": "B", "year": "1991", "genres": ["Comedy", "Drama"]}


def test_write_prepared_dense_ids_and_leave_one_out(tmp_path):
    raw = RawDataset(sequences={"10": ["b", "a", "c", "a"], "9": ["c", "b", "a"], "2": ["a", "b"]},
                     item_fields={k: {"title": k.upper()} for k in "abc"}, source="test")
    stats = write_prepared(raw, tmp_path / "out", text_template="Title: {title}", min_user_interactions=3)
    assert stats == {"users": 2, "items": 3, "interactions": 7}  # user "2" has too few interactions
    users = [json.loads(line) for line in (tmp_path / "out/users.jsonl").read_text().splitlines()]
    assert [u["id"] for u in users] == ["9", "10"]  # natural order of raw ids
    assert users[1]["items"] == [1, 0, 2, 0]
    prepared = load_prepared(tmp_path / "out")
    assert prepared.texts == ["Title: A", "Title: B", "Title: C"]
    assert split_user(prepared.sequences[1]) == ([1, 0], 2, 0)


def test_items_without_text_are_an_error_naming_them(tmp_path):
    raw = RawDataset(sequences={"1": ["a", "b", "c"]}, item_fields={"a": {"title": "A"}, "b": {}, "c": {"title": ""}},
                     source="meta.json.gz")
    with pytest.raises(DataError, match=r"meta.json.gz: 2 items have no text .*b, c"):
        write_prepared(raw, tmp_path / "out", text_template="Title: {title}", min_user_interactions=3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: (raw / "ml-100k.inter").unlink(), r"ml-100k.inter: file not found"),
    (lambda raw: (raw / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n"), r"ml-100k.inter:1: header lacks"),
    (lambda raw: open(raw / "ml-100k.inter", "a").write("5\t7\n"), r"ml-100k.inter:\d+: expected 4 tab-separated fields"),
    (lambda raw: open(raw / "ml-100k.inter", "a").write("5\t7\t3\tsoon\n"), r"ml-100k.inter:\d+: could not convert"),
    (lambda raw: (raw / "ml-100k.item").write_text(""), r"ml-100k.item:1: header lacks"),
])
def test_malformed_movielens_files_are_named(tmp_path, damage, message):
    raw = tmp_path / "raw"
    write_tiny_movielens(raw)
    damage(raw)
    with pytest.raises(DataError, match=message):
        read_movielens(raw)


def test_a_hand_run_of_fetch_with_overrides_writes_to_its_own_run_folder(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    written = []
    monkeypatch.setattr(rastp.data.movielens, "fetch_movielens", lambda wheel, sha256, out: written.append(out))
    fetch = runpy.run_path(str(REPO / "stages/fetch_ml100k.py"), run_name="not-main")["main"]
    fetch([])
    fetch(["data.ml100k.wheel='recbole==1.2.0'"])
    assert written[0].as_posix() == "data/raw/ml100k"  # where DVC's stage writes
    assert written[1].parts[:1] == ("runs",) and written[1].parts[1].startswith("ml100k-")
    assert written[1].parts[2:] == ("data", "raw", "ml100k")  # where `prepare dataset=ml100k <overrides>` reads

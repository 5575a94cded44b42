"""Amazon 2014 readers: both layouts give the same prepared files; bad input is a DataError naming file and line."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest

from rastp.config import compose_params
from rastp.data import read_raw, write_prepared
from rastp.data.amazon import read_amazon
from rastp.io import DataError

REPO = Path(__file__).resolve().parents[1]
BEAUTY = Path(__file__).resolve().parents[2] / "shared/datasets/amazon2014-beauty"
TEMPLATE = "Title: {title}; Brand: {brand}; Categories: {categories}; Price: {price}"
OUTPUTS = ("items.jsonl", "users.jsonl", "stats.json")

# Chronological sequences of 6 users over 9 items, as P5 would ship them. U2's B03 and B01 share a
# timestamp and B03 comes first in the reviews file, so a stable sort keeps B03 first.
SEQUENCES = {
    "U1": ["B01", "B02", "B05", "0123456789"],
    "U2": ["B04", "B03", "B01", "B06"],
    "U3": ["B07", "B08", "B02"],
    "U4": ["B02", "B06", "B07", "B08", "B03"],
    "U5": ["B05", "0123456789", "B04"],
    "U6": ["B08", "B01", "B03"],
}
TIED = ("U2", 2)  # this review has the same time as the one before it
META = [
    {"asin": "B01", "title": "Nail &amp; Lip Set", "brand": "OPI", "price": 12.5,
     "categories": [["Beauty", "Makeup", "Nails"], ["Beauty", "Makeup", "Lips"]]},
    {"asin": "B02", "title": "Shampoo", "categories": [["Beauty", "Hair Care"]], "description": "Mild."},
    {"asin": "B03", "title": "Conditioner", "brand": "Acme"},
    {"asin": "B04", "categories": [["Beauty", "Fragrance"]]},  # no title: text from categories only
    {"asin": "B05", "title": "Lipstick", "price": 7},
    {"asin": "B06", "title": "Mascara", "categories": [["Beauty"]]},
    {"asin": "B07", "title": "Soap", "brand": "Acme"},
    {"asin": "B08", "title": "Towel", "categories": [["Beauty", "Bath & Body"], ["Home", "Bath"]]},
    {"asin": "0123456789", "title": "Brush", "imUrl": "http://x/y.jpg"},
]
OTHER_ITEM = {"asin": "B99", "title": "Not in the 5-core", "related": {"also_bought": ["B01"]}}


def _reviews() -> list[dict]:
    """The reviews behind SEQUENCES, in an unsorted file order."""
    reviews = []
    for u, (user, items) in enumerate(SEQUENCES.items()):
        for position, asin in enumerate(items):
            tied = (user, position) == TIED
            t = 1_400_000_000 + 86_400 * (position - tied) + 3_600 * u
            reviews.append({"reviewerID": user, "asin": asin, "unixReviewTime": t, "overall": 5.0})
    return reviews[1::2][::-1] + reviews[0::2]  # scrambled, but the tie keeps its order


def _write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as f:
        f.writelines(line + "\n" for line in lines)


def write_raw(folder: Path) -> Path:
    folder.mkdir(parents=True)
    _write_gz(folder / "reviews_Beauty_5.json.gz", [json.dumps(r) for r in _reviews()])
    _write_gz(folder / "meta_Beauty.json.gz", [repr(m) for m in [OTHER_ITEM, *META]])
    return folder


def write_p5(folder: Path) -> Path:
    folder.mkdir(parents=True)
    user2id = {user: str(n) for n, user in enumerate(SEQUENCES, 1)}
    item2id = {}
    for items in SEQUENCES.values():
        for asin in items:
            item2id.setdefault(asin, str(len(item2id) + 1))
    lines = [" ".join([user2id[user], *(item2id[a] for a in items)]) for user, items in SEQUENCES.items()]
    (folder / "sequential_data.txt").write_bytes("".join(line + "\r\n" for line in lines).encode())
    maps = {"user2id": user2id, "item2id": item2id,
            "id2user": {v: k for k, v in user2id.items()}, "id2item": {v: k for k, v in item2id.items()}}
    (folder / "datamaps.json").write_text(json.dumps(maps))
    _write_gz(folder / "meta.json.gz", [repr(m) for m in reversed(META)])
    return folder


def prepare(raw_dir: Path, out_dir: Path) -> dict:
    return write_prepared(read_amazon(raw_dir, category="Beauty"), out_dir, text_template=TEMPLATE, min_user_interactions=3)


def test_both_layouts_give_identical_prepared_files(tmp_path):
    in_file_order = {}
    for review in _reviews():
        in_file_order.setdefault(review["reviewerID"], []).append(review["asin"])
    assert in_file_order != SEQUENCES  # the reader has to sort
    stats = prepare(write_raw(tmp_path / "raw"), tmp_path / "from_raw")
    assert prepare(write_p5(tmp_path / "p5"), tmp_path / "from_p5") == stats
    for name in OUTPUTS:
        assert (tmp_path / "from_raw" / name).read_bytes() == (tmp_path / "from_p5" / name).read_bytes(), name

    assert stats == {"users": 6, "items": 9, "interactions": 22}
    items = [json.loads(line) for line in (tmp_path / "from_raw/items.jsonl").read_text().splitlines()]
    raw_ids = [row["id"] for row in items]
    assert raw_ids == ["0123456789", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08"]  # natural order
    texts = {row["id"]: row["text"] for row in items}
    assert texts["B01"] == "Title: Nail & Lip Set; Brand: OPI; Categories: Makeup, Nails, Lips; Price: 12.50"
    assert texts["B04"] == "Categories: Fragrance"
    assert texts["B06"] == "Title: Mascara"  # the root-only category path adds nothing
    assert texts["B08"] == "Title: Towel; Categories: Bath & Body, Bath"
    assert "B99" not in texts
    users = [json.loads(line) for line in (tmp_path / "from_raw/users.jsonl").read_text().splitlines()]
    assert {u["id"]: [raw_ids[i] for i in u["items"]] for u in users} == SEQUENCES  # chronological, tie stable


def _rewrite_gz(path: Path, edit) -> None:
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    _write_gz(path, edit(lines))


def _insert(position: int, bad: str):
    return lambda lines: lines[:position] + [bad] + lines[position:]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20:40] = bytes(20)
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    # name: (layout writer, file, how to spoil it, what the message must say besides the file)
    "truncated reviews": (write_raw, "reviews_Beauty_5.json.gz", _truncate, r":\d+: truncated or corrupt"),
    "corrupt reviews": (write_raw, "reviews_Beauty_5.json.gz", _corrupt, r":\d+: truncated or corrupt"),
    "truncated meta": (write_raw, "meta_Beauty.json.gz", _truncate, r":\d+: truncated or corrupt"),
    "truncated P5 meta": (write_p5, "meta.json.gz", _truncate, r":\d+: truncated or corrupt"),
    "not gzip": (write_raw, "meta_Beauty.json.gz", lambda p: p.write_text("{'asin': 'B01'}\n"), r":1: truncated or corrupt"),
    "review not JSON": (write_raw, "reviews_Beauty_5.json.gz",
                        lambda p: _rewrite_gz(p, _insert(2, '{"reviewerID": "U1", ')), r":3: not JSON"),
    "review without time": (write_raw, "reviews_Beauty_5.json.gz",
                            lambda p: _rewrite_gz(p, _insert(4, '{"reviewerID": "U1", "asin": "B01"}')),
                            r":5: review needs reviewerID, asin and unixReviewTime"),
    "review not a dict": (write_raw, "reviews_Beauty_5.json.gz", lambda p: _rewrite_gz(p, _insert(0, "[1, 2]")),
                          r":1: expected a dict, got list"),
    "meta not a literal": (write_raw, "meta_Beauty.json.gz",
                           lambda p: _rewrite_gz(p, _insert(1, "{'asin': 'B01', 'title': Shampoo}")),
                           r":2: not a Python literal"),
    "meta not a dict": (write_p5, "meta.json.gz", lambda p: _rewrite_gz(p, _insert(3, "['B01', 'x']")),
                        r":4: expected a dict, got list"),
    "meta without asin": (write_p5, "meta.json.gz", lambda p: _rewrite_gz(p, _insert(0, "{'title': 'x'}")),
                          r":1: item without an asin"),
    "unknown item id": (write_p5, "sequential_data.txt",
                        lambda p: p.write_bytes(p.read_bytes().replace(b"\r\n3 ", b"\r\n3 77 ", 1)),
                        r":3: item id '77' is not in id2item of .*datamaps\.json"),
    "unknown user id": (write_p5, "sequential_data.txt", lambda p: p.write_bytes(p.read_bytes() + b"42 1 2 3\r\n"),
                        r":7: user id '42' is not in id2user of .*datamaps\.json"),
    "maps without id2item": (write_p5, "datamaps.json", lambda p: p.write_text('{"id2user": {}}'),
                             r": expected a JSON object with id2user and id2item"),
    "empty reviews": (write_raw, "reviews_Beauty_5.json.gz", lambda p: _write_gz(p, []), r": empty file"),
    "empty meta": (write_raw, "meta_Beauty.json.gz", lambda p: p.write_bytes(b""), r": empty file"),
    "empty sequences": (write_p5, "sequential_data.txt", lambda p: p.write_bytes(b"\r\n"), r": empty file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, case):
    write_layout, name, spoil, message = BAD_INPUTS[case]
    raw_dir = write_layout(tmp_path / "raw")
    spoil(raw_dir / name)
    with pytest.raises(DataError, match=re.escape(str(raw_dir / name)) + message):
        prepare(raw_dir, tmp_path / "prepared" / "beauty")
    assert not (tmp_path / "prepared").exists()


def test_folder_with_neither_layout_names_the_expected_files(tmp_path):
    raw_dir = write_p5(tmp_path / "raw")
    (raw_dir / "datamaps.json").unlink()
    with pytest.raises(DataError) as err:
        read_amazon(raw_dir, category="Toys_and_Games")
    for name in ("reviews_Toys_and_Games_5.json.gz", "meta_Toys_and_Games.json.gz", "sequential_data.txt", "datamaps.json"):
        assert name in str(err.value)


@pytest.mark.skipif(not BEAUTY.is_dir(), reason=f"{BEAUTY} not present")
def test_real_beauty_has_the_published_counts(tmp_path):
    cfg = compose_params(params_file=REPO / "params.yaml")["data"]["beauty"]
    start = time.perf_counter()
    stats = write_prepared(read_raw(cfg, BEAUTY), tmp_path / "beauty", text_template=cfg.text_template,
                           min_user_interactions=cfg.min_user_interactions)
    assert stats == {"users": 22_363, "items": 12_101, "interactions": 198_502}
    assert time.perf_counter() - start < 30

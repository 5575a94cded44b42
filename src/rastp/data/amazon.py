"""Readers for the Amazon 2014 5-core datasets (Beauty, Sports_and_Outdoors, Toys_and_Games).

`read_amazon` accepts either layout of the same data and returns the same `RawDataset`
(raw reviewerIDs and ASINs), so both give identical prepared files:

- raw Amazon 2014 files: `reviews_<Category>_5.json.gz` (one JSON review per line) and
  `meta_<Category>.json.gz` (one Python dict literal per line, for every item of the category);
- the P5 layout (P5, GRID, ...): `sequential_data.txt` (`user item item ...`, 1-based ids,
  chronological), `datamaps.json` (`id2user`, `id2item`, ...) and `meta.json.gz`.

When a folder holds both, the raw files win. Item fields for the text template: `title`,
`brand`, `categories`, `price`, `description`, with HTML entities (`&amp;`) decoded.
`categories` flattens the item's category paths into one list of unique names, in order,
without each path's root: the root is the dataset's own top-level category ("Beauty") that
(nearly) every item shares, so it only lengthens the text.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from rastp.data import RawDataset
from rastp.io import DataError, read_json

P5_FILES = ("sequential_data.txt", "datamaps.json", "meta.json.gz")

# The ASIN of a meta line, read without parsing it (Amazon writes `asin` first): most lines of
# the large meta files are items outside the 5-core, which are skipped unparsed.
_LEADING_ASIN = re.compile(r"\{'asin': '([^'\\]*)'")


def read_amazon(raw_dir: Path, *, category: str) -> RawDataset:
    """Read `raw_dir` in whichever layout it holds; raise `DataError` on bad input."""
    raw_dir = Path(raw_dir)
    reviews, meta = raw_dir / f"reviews_{category}_5.json.gz", raw_dir / f"meta_{category}.json.gz"
    seq, maps, p5_meta = (raw_dir / name for name in P5_FILES)
    if reviews.is_file() and meta.is_file():
        sequences = read_reviews(reviews)
    elif all(path.is_file() for path in (seq, maps, p5_meta)):
        sequences, meta = read_p5_sequences(seq, maps), p5_meta
    else:
        raise DataError(
            f"{raw_dir}: no Amazon data: expected either {reviews.name} and {meta.name} (raw Amazon 2014 files) "
            f"or {', '.join(P5_FILES)} (P5 layout)"
        )
    asins = {asin for items in sequences.values() for asin in items}
    return RawDataset(sequences, read_meta(meta, asins), source=f"{raw_dir} ({meta.name})")


def read_reviews(path: Path) -> dict[str, list[str]]:
    """Raw reviews -> each reviewer's ASINs by `unixReviewTime`, ties in file order."""
    reviews = defaultdict(list)
    for line_no, line in _lines(path):
        review = _parse_dict(path, line_no, line, json.loads, "JSON")
        try:
            reviews[review["reviewerID"]].append((int(review["unixReviewTime"]), review["asin"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{line_no}: review needs reviewerID, asin and unixReviewTime ({err!r})") from None
    # sorted() is stable: reviews with the same time keep their file order
    return {user: [asin for _, asin in sorted(items, key=lambda r: r[0])] for user, items in reviews.items()}


def read_p5_sequences(path: Path, maps_path: Path) -> dict[str, list[str]]:
    """P5's `sequential_data.txt` -> raw reviewerID -> raw ASINs, via `datamaps.json`."""
    maps = read_json(maps_path)
    try:
        id2user, id2item = dict(maps["id2user"]), dict(maps["id2item"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{maps_path}: expected a JSON object with id2user and id2item maps") from None

    sequences = {}
    for line_no, line in _lines(path):
        user_id, *item_ids = line.split()
        unknown = [i for i in item_ids if i not in id2item]
        if user_id not in id2user or unknown:
            kind, id_ = ("item", unknown[0]) if unknown else ("user", user_id)
            raise DataError(f"{path}:{line_no}: {kind} id {id_!r} is not in id2{kind} of {maps_path}")
        user = id2user[user_id]
        if user in sequences:
            raise DataError(f"{path}:{line_no}: user {user_id} appears on an earlier line too")
        sequences[user] = [id2item[i] for i in item_ids]
    return sequences


def read_meta(path: Path, asins: set[str]) -> dict[str, dict]:
    """Template fields of the items in `asins`, from a meta file of Python dict literals."""
    fields = {}
    for line_no, line in _lines(path):
        leading = _LEADING_ASIN.match(line)
        if leading and leading.group(1) not in asins:
            continue
        record = _parse_dict(path, line_no, line, ast.literal_eval, "a Python literal")
        asin = record.get("asin")
        if not isinstance(asin, str):
            raise DataError(f"{path}:{line_no}: item without an asin")
        if asin in asins:
            fields[asin] = item_fields(record)
    return fields


def item_fields(record: dict) -> dict:
    """The fields of one meta record that item text templates use (see the module docstring)."""
    names = []
    for category_path in record.get("categories") or []:
        for name in category_path[1:]:
            name = html.unescape(name)
            if name not in names:
                names.append(name)
    price = record.get("price")
    return {
        "title": _unescape(record.get("title")),
        "brand": _unescape(record.get("brand")),
        "categories": names,
        "price": f"{price:.2f}" if isinstance(price, (int, float)) else price,
        "description": _unescape(record.get("description")),
    }


def _unescape(value):
    return html.unescape(value) if isinstance(value, str) else value


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Stream the non-blank lines of a text or gzip file with their 1-based numbers (CRLF is fine).
    A truncated or corrupt file, or one with no lines, is a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    line_no, seen = 0, False
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    seen = True
                    yield line_no, line
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as err:
        raise DataError(f"{path}:{line_no + 1}: truncated or corrupt file ({type(err).__name__}: {err})") from None
    if not seen:
        raise DataError(f"{path}: empty file")


def _parse_dict(path: Path, line_no: int, line: str, parse: Callable[[str], object], what: str) -> dict:
    try:
        record = parse(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise DataError(f"{path}:{line_no}: not {what} ({type(err).__name__}: {err})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a dict, got {type(record).__name__}")
    return record

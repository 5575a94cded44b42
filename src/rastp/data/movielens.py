"""MovieLens-100k, read from the files that ship inside the pinned `recbole` wheel.

The wheel is fetched with pip (so pip's own index settings and cache apply), checked against
its sha256 and opened as a zip; recbole itself is never installed or imported.
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rastp.data import RawDataset
from rastp.io import DataError, atomic_path

WHEEL_MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}


def fetch_movielens(requirement: str, sha256: str, out_dir: Path) -> None:
    """pip-download `requirement` (e.g. recbole==1.2.1), verify it, extract the ml-100k files."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, requirement]
        print(f"[fetch] {' '.join(cmd[2:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise DataError(f"pip could not fetch {requirement} (data.ml100k.wheel): {done.stderr.strip()[-2000:]}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != sha256:
            raise DataError(f"{wheels[0].name}: sha256 {digest} does not match data.ml100k.wheel_sha256 {sha256}")
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(out_dir, directory=True) as staging:
            for name, member in WHEEL_MEMBERS.items():
                try:
                    (staging / name).write_bytes(wheel.read(member))
                except KeyError:
                    raise DataError(f"{wheels[0].name}: has no {member}") from None


def _read_table(path: Path, columns: list[str]) -> list[dict]:
    """RecBole's atomic files: tab-separated, a header of `name:type` fields."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}:1: header lacks columns {missing} (found {header})")
        rows = []
        for line_no, row in enumerate(reader, 2):
            if len(row) != len(header):
                raise DataError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, found {len(row)}")
            rows.append(dict(zip(header, row)))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_movielens(raw_dir: Path) -> RawDataset:
    raw_dir = Path(raw_dir)
    inter_path = raw_dir / "ml-100k.inter"
    item_path = raw_dir / "ml-100k.item"
    events = []
    for line_no, row in enumerate(_read_table(inter_path, ["user_id", "item_id", "timestamp"]), 2):
        try:
            events.append((row["user_id"], float(row["timestamp"]), int(row["item_id"])))
        except ValueError as err:
            raise DataError(f"{inter_path}:{line_no}: {err}") from None
    events.sort()  # per user: by timestamp, ties broken by item id
    sequences: dict[str, list[str]] = {}
    for user, _, item in events:
        sequences.setdefault(user, []).append(str(item))
    fields = {
        row["item_id"]: {"title": row["movie_title"], "year": row["release_year"], "genres": row["class"].split()}
        for row in _read_table(item_path, ["item_id", "movie_title", "release_year", "class"])
    }
    return RawDataset(sequences=sequences, item_fields=fields, source=str(inter_path))

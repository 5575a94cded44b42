"""prepare stage: raw files of any source -> one canonical prepared dataset.

Every source (MovieLens, Amazon raw files, Amazon in the P5 layout) is read into raw
sequences (raw user id -> raw item ids, chronological) and raw item fields; `write_prepared`
turns those into the one layout every later stage reads:

- `items.jsonl`: `{"item": dense id, "id": raw id, "text": item text}`, ordered by dense id;
- `users.jsonl`: `{"user": dense id, "id": raw id, "items": [dense ids, chronological]}`;
- `stats.json`: users, items, interactions.

Dense ids follow the natural order of the raw ids (numbers as numbers), so two layouts of the
same interactions give identical files. The leave-one-out split is positional: for each user
the last item is the test target, the second-to-last the validation target, the rest the
training history (`split_user`).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rastp.io import DataError, atomic_path, write_json

MIN_SEQUENCE = 3  # one training item, a validation target and a test target


@dataclass
class RawDataset:
    """What a reader returns: chronological raw item ids per raw user, and raw fields per item."""

    sequences: dict[str, list[str]]
    item_fields: dict[str, dict]
    source: str  # the file(s) read, for error messages


def natural_key(raw_id: str):
    return (0, int(raw_id), "") if raw_id.isdigit() else (1, 0, raw_id)


def render_text(template: str, fields: Mapping[str, object]) -> str:
    """Fill `template` ("Title: {title}; Brand: {brand}") from `fields`, dropping each
    `; `-separated segment whose fields are missing or empty. Lists are joined with ", "."""
    parts = []
    for segment in template.split("; "):
        names = [name for _, name, _, _ in string.Formatter().parse(segment) if name]
        values = {name: _field_text(fields.get(name)) for name in names}
        if names and all(values.values()):
            parts.append(segment.format(**values))
    return "; ".join(parts)


def _field_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (_field_text(v) for v in value) if t)
    return re.sub(r"\s+", " ", str(value)).strip()


def write_prepared(raw: RawDataset, out_dir: Path, *, text_template: str, min_user_interactions: int) -> dict:
    """Validate, give dense ids, render texts and write the prepared files atomically."""
    min_len = max(MIN_SEQUENCE, min_user_interactions)
    sequences = {u: items for u, items in raw.sequences.items() if len(items) >= min_len}
    if not sequences:
        raise DataError(f"{raw.source}: no user has {min_len} or more interactions")
    raw_items = sorted({i for items in sequences.values() for i in items}, key=natural_key)
    missing_meta = [i for i in raw_items if i not in raw.item_fields]
    if missing_meta:
        raise DataError(f"{raw.source}: {len(missing_meta)} items have no metadata: {_preview(missing_meta)}")
    texts = {i: render_text(text_template, raw.item_fields[i]) for i in raw_items}
    empty = [i for i in raw_items if not texts[i]]
    if empty:
        raise DataError(f"{raw.source}: {len(empty)} items have no text for template {text_template!r}: {_preview(empty)}")
    item_index = {raw_id: n for n, raw_id in enumerate(raw_items)}
    users = sorted(sequences, key=natural_key)
    with atomic_path(out_dir, directory=True) as tmp:
        with open(tmp / "items.jsonl", "w") as f:
            for raw_id in raw_items:
                f.write(json.dumps({"item": item_index[raw_id], "id": raw_id, "text": texts[raw_id]}) + "\n")
        with open(tmp / "users.jsonl", "w") as f:
            for n, raw_user in enumerate(users):
                f.write(json.dumps({"user": n, "id": raw_user, "items": [item_index[i] for i in sequences[raw_user]]}) + "\n")
        stats = {"users": len(users), "items": len(raw_items), "interactions": sum(len(sequences[u]) for u in users)}
        write_json(tmp / "stats.json", stats)
    return stats


def _preview(ids: Sequence[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


@dataclass
class Prepared:
    texts: list[str]  # by dense item id
    sequences: list[list[int]]  # by dense user id, chronological

    @property
    def num_items(self) -> int:
        return len(self.texts)


def load_prepared(folder: Path) -> Prepared:
    folder = Path(folder)
    texts, sequences = [], []
    for name, rows, key in (("items.jsonl", texts, "text"), ("users.jsonl", sequences, "items")):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: file not found (run the prepare stage first)")
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line)[key])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{line_no}: malformed prepared row ({err})") from None
    return Prepared(texts=texts, sequences=sequences)


def split_user(items: Sequence[int]) -> tuple[list[int], int, int]:
    """Leave-one-out: (training history, validation target, test target)."""
    return list(items[:-2]), items[-2], items[-1]


def read_raw(cfg: Mapping, raw_dir: Path) -> RawDataset:
    """Dispatch on the dataset's `source` param."""
    source = cfg["source"]
    if source == "movielens":
        from rastp.data.movielens import read_movielens

        return read_movielens(raw_dir)
    if source == "amazon":
        from rastp.data.amazon import read_amazon

        return read_amazon(raw_dir, category=cfg["category"])
    raise DataError(f"params.yaml: unknown data source {source!r} (movielens | amazon)")

"""Semantic IDs from quantizer codes: the L code tuple plus one de-duplication level.

Items whose L codes collide get a last token 0..n-1 (in item order) so that every item has its
own ID, as in TIGER; an item with a unique tuple gets 0. A collision group larger than the
de-duplication level's vocabulary (`sids.dedup_size`) cannot be told apart and is an error.
"""

from __future__ import annotations

import numpy as np

from rastp.config import ConfigError
from rastp.io import DataError


def _check_codes(codes: np.ndarray, source: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise DataError(f"{source}: expected codes of shape [items, levels], got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{source}: codes must be integers, got dtype {codes.dtype}")
    if codes.size and codes.min() < 0:
        raise DataError(f"{source}: codes must be non-negative, found {codes.min()}")
    return codes.astype(np.int64, copy=False)


def collision_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each item, the index of its distinct code tuple, and each tuple's group size."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_stats(codes: np.ndarray) -> dict:
    """How well the L code tuples alone identify items (before de-duplication)."""
    codes = _check_codes(codes, "codes")
    inverse, counts = collision_groups(codes)
    n = len(codes)
    return {
        "unique_fraction": float((counts[inverse] == 1).mean()) if n else 1.0,  # items no other item shares a tuple with
        "distinct_fraction": float(len(counts) / n) if n else 1.0,             # distinct tuples per item
        "largest_collision_group": int(counts.max()) if n else 0,
        "num_collision_groups": int((counts > 1).sum()),
        "items_in_collisions": int(counts[counts > 1].sum()),
    }


def assign_sids(codes: np.ndarray, dedup_size: int, source: str = "codes") -> np.ndarray:
    """[N, L] codes -> [N, L+1] semantic IDs: the codes plus the item's rank inside its collision group."""
    if isinstance(dedup_size, bool) or not isinstance(dedup_size, (int, np.integer)) or dedup_size < 1:
        raise ConfigError(f"sids.dedup_size must be a positive integer, got {dedup_size!r}")
    codes = _check_codes(codes, source)
    inverse, counts = collision_groups(codes)
    if len(counts) and counts.max() > dedup_size:
        group = int(np.argmax(counts))
        example = codes[inverse == group][0].tolist()
        raise ConfigError(
            f"{source}: {counts.max()} items share the codes {example}, more than sids.dedup_size={dedup_size} "
            f"can tell apart; raise sids.dedup_size to at least {counts.max()} or train a codebook with fewer collisions")
    # Rank of each item within its group, in item order: a stable sort by group keeps item order.
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[inverse[order]]
    return np.concatenate([codes, rank[:, None]], axis=1)


def sid_report(codes: np.ndarray, sids: np.ndarray) -> dict:
    """Collision statistics of the codes and a check that the SIDs identify every item."""
    report = collision_stats(codes)
    sids = np.asarray(sids)
    report.update({
        "num_items": int(len(sids)),
        "levels": int(sids.shape[1]) if sids.ndim == 2 else 0,
        "sids_unique": bool(len(np.unique(sids, axis=0)) == len(sids)) if len(sids) else True,
        "max_dedup_token": int(sids[:, -1].max()) if len(sids) else 0,
    })
    return report

import numpy as np
import pytest

from rastp.config import ConfigError
from rastp.io import DataError
from rastp.sids import assign_sids, collision_stats, sid_report

CODES = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5]])


def test_dedup_token_ranks_items_in_their_collision_group_in_item_order():
    sids = assign_sids(CODES, dedup_size=4)
    assert sids.dtype == np.int64 and sids.shape == (5, 3)
    np.testing.assert_array_equal(sids[:, :2], CODES)
    np.testing.assert_array_equal(sids[:, 2], [0, 1, 0, 2, 0])


def test_sids_are_a_bijection_from_items():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(500, 3))  # 27 tuples for 500 items: many collisions
    sids = assign_sids(codes, dedup_size=64)
    assert len(np.unique(sids, axis=0)) == len(codes)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    assert (sids[:, -1] < counts[inverse.reshape(-1)]).all()  # ranks stay inside each group


def test_group_larger_than_dedup_size_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"3 items share the codes \[1, 2\].*sids.dedup_size=2"):
        assign_sids(CODES, dedup_size=2, source="data/codebook/x/codes.npy")
    assign_sids(CODES, dedup_size=3)  # exactly fits


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_dedup_size(bad):
    with pytest.raises(ConfigError, match="sids.dedup_size"):
        assign_sids(CODES, dedup_size=bad)


def test_bad_codes_name_the_file():
    with pytest.raises(DataError, match="codes.npy"):
        assign_sids(np.array([1, 2, 3]), 4, source="codes.npy")
    with pytest.raises(DataError, match="non-negative"):
        assign_sids(np.array([[1], [-1]]), 4, source="codes.npy")


def test_report_counts_collisions_before_dedup():
    report = sid_report(CODES, assign_sids(CODES, 4))
    assert report["unique_fraction"] == pytest.approx(2 / 5)   # [3,4] and [3,5]
    assert report["distinct_fraction"] == pytest.approx(3 / 5)
    assert report["largest_collision_group"] == 3
    assert report["num_collision_groups"] == 1
    assert report["items_in_collisions"] == 3
    assert report["sids_unique"] and report["max_dedup_token"] == 2 and report["levels"] == 3
    assert collision_stats(np.array([[0], [1]]))["unique_fraction"] == 1.0

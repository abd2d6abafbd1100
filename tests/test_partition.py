"""Partitions of a pooled dataset across virtual sites: true partitions, reproducible,
with the skew each method promises."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.privacy.errors import FedShieldError
from fedshield.task.partition import PartitionError, partition, site_names

# 5 unbalanced classes, 1,000 records, like a small topic dataset.
LABELS = np.repeat(np.arange(5), [300, 250, 200, 150, 100])
GROUPS = np.array(["b-hospital"] * 400 + ["a-hospital"] * 350 + ["c-hospital"] * 250)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no repeats
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def mean_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each site's label distribution from the global one."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts]))


@pytest.mark.parametrize("num_sites", [1, 3, 7, 1000])
def test_iid_sizes_and_cover(num_sites: int) -> None:
    parts = partition(LABELS, num_sites, "iid", seed=0)
    assert len(parts) == num_sites
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_exact_cover(parts, len(LABELS))


def test_iid_is_shuffled_and_balanced() -> None:
    parts = partition(LABELS, 4, "iid", seed=0)
    assert not np.array_equal(parts[0], np.arange(250))  # not contiguous blocks of a sorted file
    assert mean_skew(LABELS, parts) < 0.1


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_seed_determines_the_partition(method: str) -> None:
    a = partition(LABELS, 6, method, seed=11)
    b = partition(LABELS, 6, method, seed=11)
    c = partition(LABELS, 6, method, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_is_a_partition_with_min_size(alpha: float) -> None:
    parts = partition(LABELS, 10, "dirichlet", seed=3, alpha=alpha, min_size=5)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 5
    assert_exact_cover(parts, len(LABELS))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def skew(alpha: float) -> float:
        return np.mean([mean_skew(LABELS, partition(LABELS, 8, "dirichlet", seed=s, alpha=alpha)) for s in range(5)])

    low, mid, high = skew(0.1), skew(1.0), skew(100.0)
    assert low > mid > high
    assert low > 0.4 and high < 0.1


def test_dirichlet_refuses_what_it_cannot_do() -> None:
    with pytest.raises(PartitionError, match="alpha=0.001 is too small for 50 sites") as err:
        partition(LABELS, 50, "dirichlet", seed=0, alpha=0.001)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FedShieldError)
    assert "larger federation.dirichlet_alpha or fewer sites" in str(err.value)
    with pytest.raises(PartitionError, match="cannot give each of 600 sites 2 records"):
        partition(LABELS, 600, "dirichlet", seed=0)
    with pytest.raises(PartitionError, match="must be > 0"):
        partition(LABELS, 3, "dirichlet", seed=0, alpha=0.0)


def test_natural_partition_follows_groups() -> None:
    parts = partition(LABELS, 3, "natural", seed=0, groups=GROUPS)
    assert site_names("natural", 3, GROUPS) == ["a-hospital", "b-hospital", "c-hospital"]
    assert [len(p) for p in parts] == [350, 400, 250]
    for name, p in zip(site_names("natural", 3, GROUPS), parts, strict=True):
        assert set(GROUPS[p].tolist()) == {name}
    assert_exact_cover(parts, len(LABELS))
    # The seed does not matter: the sites are the real ones.
    again = partition(LABELS, 3, "natural", seed=9, groups=GROUPS)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_natural_errors_name_both_numbers_and_the_groups() -> None:
    with pytest.raises(PartitionError) as err:
        partition(LABELS, 4, "natural", seed=0, groups=GROUPS)
    msg = str(err.value)
    assert "num_sites=4" in msg and "has 3 sites (a-hospital, b-hospital, c-hospital)" in msg
    assert "federation.num_sites=3" in msg
    with pytest.raises(PartitionError, match="num_sites=2"):
        site_names("natural", 2, GROUPS)
    with pytest.raises(PartitionError, match="needs a site for every record"):
        partition(LABELS, 3, "natural", seed=0)
    with pytest.raises(PartitionError, match="2 site entries for 1000 records"):
        partition(LABELS, 2, "natural", seed=0, groups=np.array(["x", "y"]))


def test_site_names_for_virtual_sites() -> None:
    assert site_names("iid", 3, None) == ["site-0", "site-1", "site-2"]
    assert site_names("dirichlet", 2, GROUPS) == ["site-0", "site-1"]


@pytest.mark.parametrize(
    ("num_sites", "method", "message"),
    [
        (1001, "iid", "num_sites=1001: more sites than the 1000 records to split"),
        (0, "iid", "num_sites=0: need at least 1 site"),
        (3, "shards", "unknown partition method 'shards'; allowed: iid, dirichlet, natural"),
    ],
)
def test_bad_requests_are_one_line_errors(num_sites: int, method: str, message: str) -> None:
    with pytest.raises(PartitionError) as err:
        partition(LABELS, num_sites, method, seed=0)
    assert str(err.value) == message


def test_partitions_the_real_heart_disease_hospitals() -> None:
    from fedshield.task.data import load_heart_disease

    heart = load_heart_disease()
    parts = partition(heart.labels, 4, "natural", seed=0, groups=heart.groups)
    names = site_names("natural", 4, heart.groups)
    assert dict(zip(names, map(len, parts), strict=True)) == {
        "Cleveland": 304, "Hungary": 293, "Switzerland": 123, "VA Long Beach": 200,
    }

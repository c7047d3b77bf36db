"""Skill overlap between a profile and CSR items: numba CPU against the numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kernels import skill_overlap, skill_overlap_numba, skill_overlap_reference

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BOTH = pytest.mark.parametrize("fn", [skill_overlap_numba, skill_overlap_reference])


def csr(items: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(items) + 1, np.int64)
    indptr[1:] = np.cumsum([len(i) for i in items])
    skill_ids = np.array([s for item in items for s in item], np.int32)
    return indptr, skill_ids


@st.composite
def skill_inputs(draw, max_items: int = 30):
    vocab = draw(st.integers(1, 40))
    items = draw(st.lists(st.sets(st.integers(0, vocab - 1), max_size=10), max_size=max_items))
    profile = np.array(sorted(draw(st.sets(st.integers(0, vocab + 3), max_size=12))), np.int32)
    weights = draw(st.one_of(
        st.none(),
        arrays(np.float32, vocab, elements=st.one_of(st.just(0.0), st.floats(0, 10, width=32))),
    ))
    return (profile, *csr([sorted(i) for i in items]), weights)


def assert_same(got, want):
    assert got[0].dtype == np.float32 and got[1].dtype == np.int32
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=0)


@SETTINGS
@given(skill_inputs())
def test_numba_matches_reference(args):
    assert_same(skill_overlap_numba(*args), skill_overlap_reference(*args))


@settings(max_examples=25, deadline=None, database=None)
@given(skill_inputs(max_items=1).filter(lambda a: len(a[1]) == 2))
def test_single_item(args):
    assert_same(skill_overlap_numba(*args), skill_overlap_reference(*args))


@SETTINGS
@given(skill_inputs())
def test_unweighted_is_match_profile_share(args):
    """match_profile: share = len(matched) / len(item_skills), 0 without skills."""
    profile, indptr, skill_ids, _ = args
    share, count = skill_overlap_numba(profile, indptr, skill_ids)
    have = set(profile.tolist())
    for i in range(len(indptr) - 1):
        item = skill_ids[indptr[i]:indptr[i + 1]].tolist()
        matched = [s for s in item if s in have]
        assert count[i] == len(matched)
        assert share[i] == np.float32(len(matched) / len(item) if item else 0.0)


@BOTH
def test_hand_computed(fn):
    indptr, skill_ids = csr([[1, 4, 7], [], [2, 4], [3]])
    profile = np.array([2, 4, 9], np.int32)
    share, count = fn(profile, indptr, skill_ids)
    np.testing.assert_allclose(share, [1 / 3, 0, 1, 0], rtol=1e-7)
    np.testing.assert_array_equal(count, [1, 0, 2, 0])
    weights = np.zeros(10, np.float32)
    weights[[1, 2, 4, 7]] = [1.0, 3.0, 2.0, 5.0]
    share, count = fn(profile, indptr, skill_ids, weights)
    np.testing.assert_allclose(share, [2 / 8, 0, 1, 0], rtol=1e-7)  # item 3: total weight 0 -> 0
    np.testing.assert_array_equal(count, [1, 0, 2, 0])


@BOTH
def test_empty(fn):
    share, count = fn(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32))
    assert share.shape == count.shape == (0,) and share.dtype == np.float32 and count.dtype == np.int32
    share, count = fn(np.zeros(0, np.int32), *csr([[1, 2], []]))
    np.testing.assert_array_equal(count, [0, 0])
    np.testing.assert_array_equal(share, [0, 0])
    share, count = fn([5], *csr([[], [], []]), np.ones(8, np.float32))
    np.testing.assert_array_equal(share, [0, 0, 0])


@BOTH
def test_invalid_input_is_an_error(fn):
    indptr, skill_ids = csr([[1, 4], [2, 3]])
    with pytest.raises(ValueError, match="profile"):
        fn([4, 2], indptr, skill_ids)
    with pytest.raises(ValueError, match="not sorted"):
        fn([2], *csr([[1, 4], [3, 2]]))
    with pytest.raises(ValueError, match="not sorted"):
        fn([2], *csr([[1, 1]]))
    with pytest.raises(ValueError, match="indptr"):
        fn([2], np.array([0, 3, 2, 4]), skill_ids)
    with pytest.raises(ValueError, match="indptr"):
        fn([2], np.array([0, 2, 3]), skill_ids)
    with pytest.raises(ValueError, match="outside"):
        fn([2], indptr, skill_ids, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="weights"):
        fn([2], indptr, skill_ids, -np.ones(8, np.float32))


def test_entry_point_backends():
    profile, indptr, skill_ids = np.array([1, 3], np.int32), *csr([[1, 2, 3], [4], [3]])
    want = skill_overlap_reference(profile, indptr, skill_ids)
    for backend in (None, "numba", "numpy"):
        assert_same(skill_overlap(profile, indptr.astype(np.int32), skill_ids.astype(np.int64), backend=backend), want)

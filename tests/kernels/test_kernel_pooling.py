"""Masked mean pooling + L2 normalisation: numba CPU against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from openemploi.kernels import (
    mean_pool_normalize,
    mean_pool_normalize_numba,
    mean_pool_normalize_reference,
)

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pooling_inputs(draw, max_n: int = 5):
    n = draw(st.integers(0, max_n))
    length = draw(st.integers(0, 10))
    d = draw(st.integers(0, 24))
    kind = draw(st.sampled_from(["grid", "gaussian", "large"]))
    if kind == "grid":  # multiples of 1/16: every sum is exact in float32, so results match to rounding
        hidden = draw(arrays(np.int16, (n, length, d), elements=st.integers(-256, 256))).astype(np.float32) / 16
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        hidden = rng.standard_normal((n, length, d)).astype(np.float32) * (1000.0 if kind == "large" else 1.0)
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    mask = draw(arrays(dtype, (n, length), elements=st.integers(0, 1)))
    if n and draw(st.booleans()):
        mask[draw(st.integers(0, n - 1))] = 0  # an all-padding row
    return hidden.astype(np.float32), mask


def _assert_close(got, want, hidden):
    scale = max(1.0, float(np.abs(hidden).max())) if hidden.size else 1.0
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32
    assert got[0].shape == want[0].shape == got[1].shape == (hidden.shape[0], hidden.shape[2])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6 * scale)  # pooled
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)  # normalized


@SETTINGS
@given(pooling_inputs())
def test_numba_matches_reference(inputs):
    hidden, mask = inputs
    with np.errstate(all="raise"):  # the reference never divides by zero either
        want = mean_pool_normalize_reference(hidden, mask)
    _assert_close(mean_pool_normalize_numba(hidden, mask), want, hidden)


@SETTINGS
@given(pooling_inputs(max_n=1).filter(lambda x: x[0].shape[0] == 1))
def test_single_row(inputs):
    hidden, mask = inputs
    _assert_close(mean_pool_normalize_numba(hidden, mask), mean_pool_normalize_reference(hidden, mask), hidden)


@pytest.mark.parametrize("shape", [(0, 0, 0), (0, 4, 8), (3, 0, 8), (3, 4, 0), (1, 1, 1)])
def test_empty_shapes(shape):
    hidden = np.ones(shape, np.float32)
    mask = np.ones(shape[:2], np.int64)
    for fn in (mean_pool_normalize_numba, mean_pool_normalize_reference):
        normalized, pooled = fn(hidden, mask)
        assert normalized.shape == pooled.shape == (shape[0], shape[2])
        if shape[1] == 0:
            assert not normalized.any() and not pooled.any()


def test_hand_computed():
    hidden = np.array([[[1, 2], [3, 4], [100, 100]], [[5, 5], [7, 7], [9, 9]]], np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.int32)
    for fn in (mean_pool_normalize_numba, mean_pool_normalize_reference):
        normalized, pooled = fn(hidden, mask)
        np.testing.assert_allclose(pooled, [[2, 3], [0, 0]], rtol=1e-7)
        np.testing.assert_allclose(normalized, [[2 / np.sqrt(13), 3 / np.sqrt(13)], [0, 0]], rtol=1e-6)


def test_mask_values_are_weights_like_the_onnx_graph():
    hidden = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    mask = np.array([[2, 1]], np.int64)  # (2 * [1, 0] + [0, 1]) / 3
    for fn in (mean_pool_normalize_numba, mean_pool_normalize_reference):
        _, pooled = fn(hidden, mask)
        np.testing.assert_allclose(pooled, [[2 / 3, 1 / 3]], rtol=1e-6)


def test_padding_is_skipped_by_the_kernel():
    hidden = np.array([[[1.0, 2.0], [np.nan, np.inf]]], np.float32)
    normalized, pooled = mean_pool_normalize_numba(hidden, np.array([[1, 0]]))
    np.testing.assert_allclose(pooled, [[1, 2]])
    assert np.isfinite(normalized).all()


def test_other_mask_dtypes_and_entry_point():
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((4, 6, 10)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.5
    want = mean_pool_normalize_reference(hidden, mask.astype(np.int64))
    for backend in (None, "numba", "numpy"):
        got = mean_pool_normalize(hidden, mask, backend=backend)  # bool mask is cast
        _assert_close(got, want, hidden)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        mean_pool_normalize_numba(np.zeros((2, 3, 4), np.float32), np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError):
        mean_pool_normalize_reference(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64))

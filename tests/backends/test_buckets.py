"""server/backends/buckets.py, the padding that widens a batch to a bucket, and the [backend] config keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from openemploi.backends.base import Device, Precision
from openemploi.backends.buckets import DEFAULT_LENGTH_BUCKETS, batch_bucket, bucket_for, length_buckets
from openemploi.backends.options import BackendConfig
from openemploi.config import ConfigError, load_config
from openemploi.padding import widen

configured = st.lists(st.integers(1, 2048), min_size=1, max_size=8)


@given(configured, st.integers(8, 1024))
def test_bucket_set_is_sorted_capped_and_ends_at_max_tokens(sizes, max_tokens):
    buckets = length_buckets(sizes, max_tokens)
    assert list(buckets) == sorted(set(buckets))
    assert buckets[-1] == max_tokens and all(b <= max_tokens for b in buckets)
    assert set(buckets) - {max_tokens} <= set(sizes)


@given(configured, st.integers(8, 1024), st.data())
def test_bucket_is_the_smallest_configured_size_that_fits(sizes, max_tokens, data):
    buckets = length_buckets(sizes, max_tokens)
    length = data.draw(st.integers(1, max_tokens))
    bucket = bucket_for(length, buckets)
    assert bucket >= length and bucket in buckets
    assert all(b < length for b in buckets if b < bucket)


def test_lengths_past_the_last_bucket_or_without_buckets_are_left_alone():
    assert bucket_for(600, length_buckets(DEFAULT_LENGTH_BUCKETS)) == 600
    assert length_buckets([], 512) == () and bucket_for(37, ()) == 37
    assert length_buckets(DEFAULT_LENGTH_BUCKETS, 256) == (16, 32, 64, 128, 256)
    assert length_buckets(DEFAULT_LENGTH_BUCKETS, 200) == (16, 32, 64, 128, 200)


@given(st.integers(1, 600), st.sampled_from([1, 8, 64, 256]))
def test_batch_bucket_is_a_power_of_two_up_to_the_cap(rows, max_batch):
    bucket = batch_bucket(rows, max_batch)
    assert bucket >= rows
    if rows < max_batch:
        assert bucket <= max_batch and (bucket == max_batch or bucket & (bucket - 1) == 0)
        assert bucket < 2 * rows or bucket == 1
    else:
        assert bucket == rows


@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 12), st.integers(0, 4))
def test_widen_keeps_the_batch_and_masks_every_added_position(rows, width, extra_len, extra_rows):
    rng = np.random.default_rng(rows * 100 + width)
    ids = rng.integers(2, 1000, (rows, width), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, width // 2 + 1 :] = 0
    out_ids, out_mask = widen(ids, mask, width + extra_len, rows + extra_rows, pad_id=1)
    assert out_ids.shape == out_mask.shape == (rows + extra_rows, width + extra_len)
    np.testing.assert_array_equal(out_ids[:rows, :width], ids)
    np.testing.assert_array_equal(out_mask[:rows, :width], mask)
    assert not out_mask[:rows, width:].any() and (out_ids[:rows, width:] == 1).all()
    # padded rows attend to one position only, so no attention row is empty (NaN in some kernels)
    assert (out_mask[rows:].sum(axis=1) == 1).all()


def test_widen_refuses_to_shrink():
    ids = np.ones((2, 10), np.int64)
    with pytest.raises(ValueError, match="cannot pad"):
        widen(ids, ids, 8)


# --------------------------------------------------------------------------- config keys


def test_backend_config_reads_buckets_and_gpu_keys_from_toml_and_environment(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[backend]\nlength_buckets = [128, 32, 64]\ntorch_dtype = "bf16"\ncuda_graphs = true\ntensorrt = true\n')
    backend = load_config(path, env={}).backend
    assert backend.length_buckets == (32, 64, 128)
    assert (backend.torch_dtype, backend.cuda_graphs, backend.tensorrt) == (Precision.BF16, True, True)
    env = {"OPENEMPLOI_BACKEND_LENGTH_BUCKETS": "16,48", "OPENEMPLOI_BACKEND_CPU_LENGTH_BUCKETS": "true"}
    backend = load_config(None, env=env).backend
    assert backend.length_buckets == (16, 48) and backend.cpu_length_buckets is True
    assert load_config(None, env={"OPENEMPLOI_BACKEND_DEVICE": "cuda"}).backend.device is Device.CUDA
    assert load_config(None, env={"OPENEMPLOI_BACKEND_LENGTH_BUCKETS": ""}).backend.length_buckets == ()


@pytest.mark.parametrize(
    "values, match",
    [
        ({"torch_dtype": "fp8"}, "torch_dtype"),
        ({"length_buckets": ("16", "x")}, "length_buckets"),
        ({"length_buckets": (0, 16)}, "length_buckets"),
        ({"device": "gpu"}, "device"),
        ({"cpu_precision": "fp16"}, "cpu_precision"),
        ({"device": 1}, "device"),
    ],
)
def test_backend_config_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        BackendConfig(**values)


def test_bad_backend_key_in_config_file_names_the_key(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[backend]\ntorch_dtype = "fp64"\n')
    with pytest.raises(ConfigError, match="torch_dtype"):
        load_config(path, env={})


def test_backend_config_turns_strings_into_enums_and_says_what_it_accepts():
    config = BackendConfig(device="cpu", cpu_precision="int8", torch_dtype="bf16")
    assert (config.device, config.cpu_precision, config.torch_dtype) == (Device.CPU, Precision.INT8, Precision.BF16)
    assert isinstance(config.device, Device)
    with pytest.raises(ValueError, match=r"^backend.device must be auto, cpu or cuda, got 'gpu'$"):
        BackendConfig(device="gpu")
    with pytest.raises(ValueError, match=r"^backend.cpu_precision must be auto, int8 or fp32, got 'fp16'$"):
        BackendConfig(cpu_precision="fp16")
    with pytest.raises(ValueError, match=r"^backend.torch_dtype must be fp16 or bf16, got 'fp32'$"):
        BackendConfig(torch_dtype="fp32")

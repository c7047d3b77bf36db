"""Backend selection of the kernel entry points (no GPU needed)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from openemploi import kernels
from openemploi.kernels import _dispatch


class FakeDeviceArray:
    """Looks like a CUDA array to the dispatcher (CuPy, torch and numba expose this attribute)."""

    __cuda_array_interface__: ClassVar[dict] = {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_auto_is_numba_for_host_arrays():
    assert _dispatch.pick(None, np.zeros(3), None, 5) == "numba"
    assert _dispatch.pick("auto", np.zeros(3)) == "numba"
    for backend in ("numpy", "numba"):
        assert _dispatch.pick(backend, np.zeros(3)) == backend


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.mean_pool_normalize(np.zeros((1, 1, 1), np.float32), np.ones((1, 1)), backend="torch")


def test_device_inputs_go_to_cuda_only_when_available(monkeypatch):
    assert _dispatch.on_device(FakeDeviceArray())
    assert not _dispatch.on_device(np.zeros(2))
    monkeypatch.setattr(_dispatch, "cuda_available", lambda: False)
    with pytest.raises(kernels.BackendUnavailable):
        _dispatch.pick(None, np.zeros(2), FakeDeviceArray())
    with pytest.raises(kernels.BackendUnavailable):
        kernels.fuse_topk([1], [1.0], [2], [1.0], 1, backend="cuda")
    monkeypatch.setattr(_dispatch, "cuda_available", lambda: True)
    assert _dispatch.pick(None, np.zeros(2), FakeDeviceArray()) == "cuda"
    assert _dispatch.pick("cuda", np.zeros(2)) == "cuda"
    assert _dispatch.pick("numpy", FakeDeviceArray()) == "numpy"  # explicit host backend: copied back


def test_every_kernel_has_its_four_functions():
    for name in ("mean_pool_normalize", "fuse_topk"):
        for suffix in ("", "_reference", "_numba", "_cuda"):
            assert callable(getattr(kernels, name + suffix))

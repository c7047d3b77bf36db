"""server/backends/select.py: which backend `auto` picks, from injected machine capabilities,
and the real encoders it opens on this (CPU-only) machine."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.backends.onnx import BackendUnavailable, OnnxEncoder
from server.backends.options import BackendConfig
from server.backends.select import Capabilities, Choice, open_encoder, plan

CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_ORT = ("CPUExecutionProvider",)
ALL_GRAPHS = frozenset({"fp32", "int8", "fp16"})
REPO_ROOT = Path(__file__).resolve().parents[2]


def caps(has_cuda=True, providers=CUDA_ORT, graphs=ALL_GRAPHS, torch=True, checkpoint=True) -> Capabilities:
    return Capabilities(has_cuda, providers, frozenset(graphs), torch, checkpoint)


def first(requested="auto", config: BackendConfig | None = None, **kwargs) -> Choice:
    return plan(requested, config or BackendConfig(), caps(**kwargs))[0]


# --------------------------------------------------------------------------- auto, decided


def test_auto_gpu_with_ort_cuda_and_fp16_graph_is_onnx_fp16_then_torch_as_fallback():
    choices = plan("auto", BackendConfig(), caps())
    assert [(c.backend, c.device, c.precision) for c in choices] == [
        ("onnx", "cuda", "fp16"), ("torch", "cuda", "fp16"), ("onnx", "cpu", "auto"),
    ]
    assert "onnxruntime CUDA provider" in choices[0].reason


def test_auto_gpu_without_ort_cuda_provider_is_torch_in_the_configured_dtype():
    choice = first(providers=CPU_ORT, config=BackendConfig(torch_dtype="bf16"))
    assert (choice.backend, choice.device, choice.precision) == ("torch", "cuda", "bf16")
    assert "no CUDA provider" in choice.reason


def test_auto_gpu_without_fp16_graph_is_torch():
    choice = first(graphs={"fp32", "int8"})
    assert (choice.backend, choice.device) == ("torch", "cuda") and "no fp16 graph" in choice.reason


def test_auto_cpu_is_onnx_int8_or_what_cpu_precision_says():
    choice = first(has_cuda=False, providers=CPU_ORT)
    assert (choice.backend, choice.device, choice.precision) == ("onnx", "cpu", "auto")
    assert "no CUDA device" in choice.reason
    assert first(has_cuda=False, config=BackendConfig(cpu_precision="fp32")).precision == "fp32"


def test_device_cpu_wins_over_a_visible_gpu():
    choices = plan("auto", BackendConfig(device="cpu"), caps())
    assert [(c.backend, c.device) for c in choices] == [("onnx", "cpu")]
    assert "device=cpu" in choices[0].reason


def test_auto_without_any_graph_is_torch_on_gpu_and_on_cpu():
    gpu = first(graphs=())
    assert (gpu.backend, gpu.device) == ("torch", "cuda") and "does not export" in gpu.reason
    cpu = first(has_cuda=False, graphs=())
    assert (cpu.backend, cpu.device, cpu.precision) == ("torch", "cpu", "fp32")


def test_auto_without_torch_and_without_cuda_provider_serves_on_the_cpu():
    choices = plan("auto", BackendConfig(), caps(providers=CPU_ORT, torch=False))
    assert [(c.backend, c.device) for c in choices] == [("onnx", "cpu")]


def test_device_cuda_never_falls_back_to_the_cpu():
    choices = plan("auto", BackendConfig(device="cuda"), caps())
    assert {c.device for c in choices} == {"cuda"}
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        plan("auto", BackendConfig(device="cuda"), caps(has_cuda=False))


def test_nothing_servable_raises_and_says_what_is_missing():
    with pytest.raises(BackendUnavailable, match=r"graphs \[\].*torch"):
        plan("auto", BackendConfig(), caps(has_cuda=False, graphs=(), torch=False))


def test_tensorrt_is_named_when_asked_and_present():
    providers = ("TensorrtExecutionProvider", *CUDA_ORT)
    assert "TensorRT" in first(providers=providers, config=BackendConfig(tensorrt=True)).reason
    assert "TensorRT" not in first(providers=CUDA_ORT, config=BackendConfig(tensorrt=True)).reason


# --------------------------------------------------------------------------- explicit backends


def test_explicit_torch_needs_torch_and_a_checkpoint():
    assert first("torch", has_cuda=False).device == "cpu"
    assert (first("torch").device, first("torch").precision) == ("cuda", "fp16")
    with pytest.raises(BackendUnavailable, match="torch"):
        plan("torch", BackendConfig(), caps(torch=False))
    with pytest.raises(BackendUnavailable, match="checkpoint"):
        plan("torch", BackendConfig(), caps(checkpoint=False))


def test_explicit_onnx_never_picks_torch():
    assert [c.backend for c in plan("onnx", BackendConfig(), caps(providers=CPU_ORT))] == ["onnx"]
    assert first("onnx").device == "cuda" and first("onnx", has_cuda=False).device == "cpu"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        plan("tensorflow", BackendConfig(), caps())


# --------------------------------------------------------------------------- real encoders, this machine


@dataclasses.dataclass(frozen=True)
class WithoutGraphs:
    """A built version whose checkpoint did not export: the same files, minus the ONNX graphs."""

    inner: object

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def graphs(self) -> dict[str, Path]:
        return {}


def test_auto_on_this_cpu_machine_opens_onnx_int8(default_version):
    encoder = open_encoder(default_version, "auto", BackendConfig(device="cpu"))
    assert isinstance(encoder, OnnxEncoder)
    assert (encoder.info.backend, encoder.info.device, encoder.info.precision) == ("onnx", "cpu", "int8")
    assert encoder.info.detail.startswith("auto: device=cpu asked")


def test_a_failing_gpu_candidate_falls_back_and_the_detail_says_why(default_version):
    """Claim a GPU with the ORT CUDA provider: the real onnxruntime here has none, so the onnx
    CUDA candidate fails to open, torch CUDA fails too, and the CPU int8 graph serves. The fp16
    graph is claimed too: a CPU-only build has none, and without it onnx CUDA is no candidate."""
    fake_gpu = Capabilities(True, CUDA_ORT, frozenset(default_version.graphs()) | {"fp16"}, True, True)
    encoder = open_encoder(default_version, "auto", BackendConfig(), caps=fake_gpu)
    assert (encoder.info.backend, encoder.info.device, encoder.info.precision) == ("onnx", "cpu", "int8")
    assert "skipped onnx cuda" in encoder.info.detail and "skipped torch cuda" in encoder.info.detail


def test_auto_without_graphs_serves_the_checkpoint_with_torch(default_version):
    version = WithoutGraphs(default_version)
    encoder = open_encoder(version, "auto", BackendConfig(device="cpu"))
    try:
        assert (encoder.info.backend, encoder.info.device, encoder.info.precision) == ("torch", "cpu", "fp32")
        assert "does not export" in encoder.info.detail
        ids = np.array([[0, 1000, 2000, 2], [0, 3000, 2, 1]], dtype=np.int64)
        mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.int64)
        normalized, pooled = encoder.encode(ids, mask)
        assert normalized.shape == pooled.shape == (2, default_version.dim)
        np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    finally:
        encoder.close()


def test_probe_on_this_machine_sees_no_cuda_and_the_built_files(default_version):
    found = Capabilities.probe(default_version.graphs(), default_version.checkpoint_path, BackendConfig())
    assert found.graphs == frozenset(default_version.graphs()) and found.has_checkpoint
    assert found.torch_available  # the build extra is installed here
    if "CUDAExecutionProvider" not in found.ort_providers:
        assert found.has_cuda is False


def test_without_torch_the_default_model_still_opens_on_onnx(default_version):
    """The `build` extra (torch, transformers) is optional for serving: block both and open."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from server.backends.options import BackendConfig\n"
        "from server.backends.select import Capabilities, open_encoder\n"
        "from server.modelrepo.repository import ModelRepository\n"
        f"v = ModelRepository({str(default_version.folder.parents[1])!r}).latest({default_version.name!r})\n"
        "caps = Capabilities.probe(v.graphs(), v.checkpoint_path, BackendConfig())\n"
        "e = open_encoder(v, 'auto', BackendConfig())\n"
        "print(caps.torch_available, e.info.backend, e.info.device, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "onnx", "cpu", "False"]

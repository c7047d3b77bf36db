"""server/backends/select.py: which backend `auto` picks, from injected machine capabilities,
and the real encoders it opens on this (CPU-only) machine."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openemploi.backends.base import BackendKind, BackendUnavailable, Choice, Device, ExecutionProvider, Precision
from openemploi.backends.onnx import OnnxEncoder
from openemploi.backends.options import BackendConfig
from openemploi.backends.select import Capabilities, open_encoder, plan

CUDA_ORT = (ExecutionProvider.CUDA, ExecutionProvider.CPU)
CPU_ORT = (ExecutionProvider.CPU,)
ALL_GRAPHS = (Precision.FP32, Precision.INT8, Precision.FP16)
CHECKPOINT = Path("hf")
REPO_ROOT = Path(__file__).resolve().parents[2]


def caps(has_cuda=True, providers=CUDA_ORT, graphs=ALL_GRAPHS, torch=True, checkpoint=True, max_tokens=512) -> Capabilities:
    files = {Precision(p): Path(f"model.{p}.onnx") for p in graphs}
    return Capabilities(has_cuda, tuple(providers), files, torch, CHECKPOINT if checkpoint else None, max_tokens)


def first(requested="auto", config: BackendConfig | None = None, **kwargs) -> Choice:
    return plan(requested, config or BackendConfig(), caps(**kwargs))[0]


# --------------------------------------------------------------------------- auto, decided


def test_auto_gpu_with_ort_cuda_and_fp16_graph_is_onnx_fp16_then_torch_as_fallback():
    choices = plan("auto", BackendConfig(), caps())
    assert [(c.backend, c.device, c.precision) for c in choices] == [
        ("onnx", "cuda", "fp16"),
        ("torch", "cuda", "fp16"),
        ("onnx", "cpu", "int8"),
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
    assert (choice.backend, choice.device, choice.precision) == ("onnx", "cpu", "int8")
    assert "no CUDA device" in choice.reason
    assert first(has_cuda=False, config=BackendConfig(cpu_precision="fp32")).precision == "fp32"


def test_auto_cpu_precision_is_fp32_without_an_int8_graph_and_says_so():
    choice = first(has_cuda=False, graphs={"fp32"})
    assert choice.precision == "fp32" and choice.model_path == Path("model.fp32.onnx")
    assert choice.notes == ("no int8 graph built for this model",)


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


def test_tensorrt_goes_first_and_reads_the_fp32_graph():
    """TensorRT picks its own fp16 kernels from the fp32 graph; the CUDA provider stays behind it."""
    providers = (ExecutionProvider.TENSORRT, *CUDA_ORT)
    choice = first(providers=providers, config=BackendConfig(tensorrt=True))
    assert choice.providers == (ExecutionProvider.TENSORRT, *CUDA_ORT)
    assert (choice.precision, choice.model_path) == ("fp16", Path("model.fp32.onnx"))
    assert first(providers=providers).providers == CUDA_ORT  # present but not asked


# --------------------------------------------------------------------------- what a choice carries


def test_onnx_cuda_choice_opens_the_fp16_graph_with_io_binding_and_length_buckets():
    choice = first(max_tokens=200)
    assert (choice.model_path, choice.providers, choice.io_binding) == (Path("model.fp16.onnx"), CUDA_ORT, True)
    assert choice.length_buckets == (16, 32, 64, 128, 200)


def test_onnx_cpu_choice_buckets_only_when_asked():
    assert first(has_cuda=False).length_buckets == ()
    bucketed = first(has_cuda=False, config=BackendConfig(cpu_length_buckets=True, length_buckets=(32, 64)))
    assert bucketed.length_buckets == (32, 64, 512) and bucketed.providers == CPU_ORT and not bucketed.io_binding


def test_torch_choice_opens_the_checkpoint_with_cuda_graphs_only_on_cuda():
    config = BackendConfig(cuda_graphs=True, torch_dtype="bf16")
    gpu = first("torch", config=config)
    assert (gpu.model_path, gpu.precision, gpu.cuda_graphs) == (CHECKPOINT, "bf16", True)
    cpu = first("torch", config=config, has_cuda=False)
    assert (cpu.precision, cpu.cuda_graphs, cpu.length_buckets) == ("fp32", False, ())


def test_a_choice_is_never_auto():
    with pytest.raises(ValueError, match="auto"):
        Choice(BackendKind.ONNX, Device.AUTO, Precision.INT8, Path("model.int8.onnx"), "test")
    with pytest.raises(ValueError, match="auto"):
        Choice(BackendKind.ONNX, Device.CPU, Precision.AUTO, Path("model.int8.onnx"), "test")


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


def test_explicit_onnx_with_cuda_provider_but_no_fp16_graph_serves_on_the_cpu():
    choice = first("onnx", graphs={"fp32", "int8"})
    assert (choice.device, choice.precision) == ("cpu", "int8") and "fp16" in choice.reason


def test_explicit_onnx_on_device_cuda_says_which_of_provider_or_graph_is_missing():
    with pytest.raises(BackendUnavailable, match="no CUDA provider"):
        plan("onnx", BackendConfig(device="cuda"), caps(providers=CPU_ORT))
    with pytest.raises(BackendUnavailable, match="fp16 graph"):
        plan("onnx", BackendConfig(device="cuda"), caps(graphs={"fp32", "int8"}))


def test_a_missing_cpu_precision_graph_is_named_with_what_exists():
    with pytest.raises(BackendUnavailable, match=r"no int8 graph.*\['fp32'\]"):
        plan("onnx", BackendConfig(device="cpu", cpu_precision="int8"), caps(graphs={"fp32"}))


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


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime on the claimed CUDA provider
def test_a_failing_gpu_candidate_falls_back_and_the_detail_says_why(default_version):
    """Claim a GPU with the ORT CUDA provider: the real onnxruntime here has none, so the onnx
    CUDA candidate fails to open, torch CUDA fails too, and the CPU int8 graph serves. The fp16
    graph is claimed too (the fp32 file stands in): a CPU-only build has none, and without it
    onnx CUDA is no candidate."""
    found = Capabilities.probe(default_version, BackendConfig())
    graphs = {**found.graphs, Precision.FP16: found.graphs[Precision.FP32]}
    fake_gpu = dataclasses.replace(found, has_cuda=True, ort_providers=CUDA_ORT, graphs=graphs)
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
    found = Capabilities.probe(default_version, BackendConfig())
    assert found.graphs == default_version.graphs() and found.checkpoint == default_version.checkpoint_path
    assert found.max_tokens == default_version.max_tokens
    assert found.torch_available  # the build extra is installed here
    if ExecutionProvider.CUDA not in found.ort_providers:
        assert found.has_cuda is False


def test_without_torch_the_default_model_still_opens_on_onnx(default_version):
    """The `build` extra (torch, transformers) is optional for serving: block both and open."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from openemploi.backends.options import BackendConfig\n"
        "from openemploi.backends.select import Capabilities, open_encoder\n"
        "from openemploi.runtime.repository import ModelRepository\n"
        f"v = ModelRepository({str(default_version.folder.parents[1])!r}).latest({default_version.name!r})\n"
        "caps = Capabilities.probe(v, BackendConfig())\n"
        "e = open_encoder(v, 'auto', BackendConfig())\n"
        "print(caps.torch_available, e.info.backend, e.info.device, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "onnx", "cpu", "False"]

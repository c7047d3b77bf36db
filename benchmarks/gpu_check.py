"""GPU check: providers, embedding throughput and latency per backend, MFU, search, kernels.

Runs on any machine (each missing piece is reported, not fatal) and prints a short table
last. Every section has its own time budget so the whole run stays under 5 minutes.

Embedding rows use the server's own encoders on the same texts: ONNX CPU int8, ONNX CUDA fp16
(length buckets + IO binding; TensorRT with --tensorrt), and the torch backend in fp16 and bf16,
each with and without CUDA graphs, at batch 1/32/256. Each GPU engine is also compared with
ONNX CPU fp32 on 64 probe texts of 5-512 tokens (the `fidelity` rows).

    bash benchmarks/gpu_check.sh [--quick] [--tensorrt] [--torch-cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import socket
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "multilingual-e5-small"
ROWS: list[tuple[str, str, str]] = []  # (section, item, result) for the final table


def row(section: str, item: str, result: str) -> None:
    ROWS.append((section, item, result))
    print(f"[{section}] {item}: {result}", flush=True)


def providers() -> dict[str, bool]:
    found = {}
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
        found["ort_cuda"] = "CUDAExecutionProvider" in available
        found["ort_tensorrt"] = "TensorrtExecutionProvider" in available
        row("providers", "onnxruntime", f"{ort.__version__}: {', '.join(available)}")
    except Exception as exc:
        row("providers", "onnxruntime", f"unavailable ({exc})")
    try:
        import torch

        found["torch_cuda"] = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if found["torch_cuda"] else "no CUDA"
        row("providers", "torch", f"{torch.__version__}: {name}")
    except Exception as exc:
        found["torch_cuda"] = False
        row("providers", "torch", f"unavailable ({exc})")
    try:
        import faiss

        found["faiss_gpus"] = faiss.get_num_gpus() > 0
        row("providers", "faiss", f"{faiss.__version__}: {faiss.get_num_gpus()} GPUs")
    except Exception as exc:
        found["faiss_gpus"] = False
        row("providers", "faiss", f"unavailable ({exc})")
    try:
        from numba import cuda

        found["numba_cuda"] = cuda.is_available()
        row("providers", "numba.cuda", "available" if found["numba_cuda"] else "no device")
    except Exception as exc:
        found["numba_cuda"] = False
        row("providers", "numba.cuda", f"unavailable ({exc})")
    return found


def version_with_fp16(found: dict[str, bool]):
    from openemploi.build.build import BuildOptions, build_model
    from openemploi.runtime.repository import ModelRepository

    repo = ModelRepository(REPO / "models")
    started = time.perf_counter()
    version = build_model(repo, MODEL, BuildOptions(fp16=True, progress=False))
    row(
        "model",
        "version",
        f"{version.version} ({sorted(version.graphs())}, {time.perf_counter() - started:.0f}s to build or reuse)",
    )
    fidelity = version.manifest["fidelity"]["metrics"]
    if "fp16_cosine_min" in fidelity:
        row("model", "fp16 vs fp32 cosine min", f"{fidelity['fp16_cosine_min']:.5f}")
    return version


def texts_of_tokens(tokens: int) -> str:
    return " ".join(["emploi"] * max(tokens - 6, 1))


def tokenizer_of(version):
    from openemploi.tokenize import TextTokenizer, TokenizerConfig

    return TextTokenizer(
        version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix)
    )


def probe_batches(version) -> list[tuple[np.ndarray, np.ndarray]]:
    """64 probe texts from 5 to 512 tokens, in mixed-length batches of 16: the fidelity check's input."""
    from openemploi.build.fidelity import Probe
    from openemploi.padding import pad_sequences
    from openemploi.tokenize import TextKind

    tokenizer = tokenizer_of(version)
    tokens = tokenizer.encode(Probe.load().texts, TextKind.PASSAGE)
    by_length = sorted(range(len(tokens)), key=lambda i: len(tokens[i].ids))
    picked = [by_length[i] for i in np.linspace(0, len(by_length) - 1, 64).round().astype(int)]
    np.random.default_rng(0).shuffle(picked)
    return [pad_sequences([tokens[i].ids for i in picked[s : s + 16]], tokenizer.pad_id) for s in range(0, 64, 16)]


def reference_vectors(version, batches) -> np.ndarray:
    """ONNX fp32 on the CPU: what every GPU engine is compared against."""
    from openemploi.backends import BackendKind
    from openemploi.backends.options import BackendConfig
    from openemploi.backends.select import open_encoder

    encoder = open_encoder(version, BackendKind.ONNX, BackendConfig(device="cpu", cpu_precision="fp32"))
    return np.concatenate([encoder.encode(ids, mask)[0] for ids, mask in batches])


def fidelity(encoder, batches, reference: np.ndarray | None, label: str) -> None:
    if reference is None:
        return
    ours = np.concatenate([encoder.encode(ids, mask)[0] for ids, mask in batches])
    cos = (ours * reference).sum(axis=1)
    row(
        "fidelity",
        f"{label} vs onnx cpu fp32 (64 probe texts, 5-512 tokens)",
        f"cosine min {cos.min():.5f}, mean {cos.mean():.6f}",
    )


def timed(encoder, label: str, batches: list[int], budget_s: float, version) -> dict:
    """texts/s and p50 of `encoder.encode` on `batch` copies of a 32-token text, for each batch size."""
    from openemploi.padding import pad_sequences
    from openemploi.tokenize import TextKind

    tokenizer = tokenizer_of(version)
    results = {}
    for batch in batches:
        tokens = tokenizer.encode([texts_of_tokens(32)] * batch, TextKind.PASSAGE)
        ids, mask = pad_sequences([t.ids for t in tokens], tokenizer.pad_id)
        encoder.encode(ids, mask)  # warm-up (and CUDA graph capture) outside the timing
        times = []
        deadline = time.perf_counter() + budget_s / len(batches)
        while time.perf_counter() < deadline or len(times) < 3:
            started = time.perf_counter()
            encoder.encode(ids, mask)
            times.append(time.perf_counter() - started)
        p50 = float(np.median(times))
        results[batch] = {"texts_per_s": batch / p50, "p50_ms": p50 * 1e3, "tokens": int(ids.shape[1])}
        row("embed", f"{label} b{batch}", f"{batch / p50:,.0f} texts/s, p50 {p50 * 1e3:.2f} ms")
    return results


def bench_onnx(
    version, device: str, precision: str, batches: list[int], budget_s: float, probe=None, reference=None, tensorrt: bool = False
) -> dict:
    """The server's ONNX backend as it serves: length buckets and IO binding on CUDA."""
    from openemploi.backends import BackendKind
    from openemploi.backends.options import BackendConfig
    from openemploi.backends.select import open_encoder

    config = BackendConfig(device=device, cpu_precision=precision, tensorrt=tensorrt)
    encoder = open_encoder(version, BackendKind.ONNX, config, max_batch=max(batches), pad_id=tokenizer_of(version).pad_id)
    info = encoder.info
    label = f"onnx {info.device} {info.precision}{' trt' if 'TensorRT' in info.detail else ''}"
    row("backend", label, info.detail)
    if probe is not None:
        fidelity(encoder, probe, reference, label)
    results = timed(encoder, label, batches, budget_s, version)
    encoder.close()
    return results


def bench_torch_backend(
    version, device: str, dtype: str, graphs: bool, batches: list[int], budget_s: float, probe=None, reference=None
) -> dict:
    """The server's torch backend (server/backends/torch_backend.py) as it serves."""
    from openemploi.backends import BackendKind
    from openemploi.backends.options import BackendConfig
    from openemploi.backends.select import open_encoder

    config = BackendConfig(device=device, torch_dtype=dtype, cuda_graphs=graphs)
    started = time.perf_counter()
    encoder = open_encoder(version, BackendKind.TORCH, config, max_batch=max(batches), pad_id=tokenizer_of(version).pad_id)
    label = f"torch {device} {encoder.info.precision}{' graphs' if graphs else ''}"
    row("backend", label, f"{encoder.info.detail} (loaded in {time.perf_counter() - started:.1f}s)")
    if probe is not None:
        fidelity(encoder, probe, reference, label)
    results = timed(encoder, label, batches, budget_s, version)
    if graphs:
        row(
            "backend",
            f"{label} captured",
            f"{len(encoder.graph_shapes)} shapes: {encoder.graph_shapes}; {encoder.info.detail[-80:]}",
        )
    encoder.close()
    return results


def flops_per_token(version) -> float:
    """2 x parameters in the encoder's matmuls + attention (for 32-token sequences)."""
    config = json.loads((version.checkpoint_path / "config.json").read_text())
    h, layers, ff = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    seq = 32
    per_layer = 2 * (4 * h * h + 2 * h * ff) + 2 * 2 * seq * h
    return float(layers * per_layer)


def matmul_peak(torch) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - started)


def bench_search(found: dict[str, bool], n: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, 384), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:64] + 0.01
    if found.get("faiss_gpus"):
        import faiss

        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(384))
        index.add(data)
        index.search(queries, 10)
        started = time.perf_counter()
        index.search(queries, 10)
        row("search", f"faiss GPU flat n={n:,}", f"{64 / (time.perf_counter() - started):,.0f} queries/s at batch 64")
    if found.get("torch_cuda"):
        import torch

        matrix = torch.from_numpy(data).cuda().half()
        q = torch.from_numpy(queries).cuda().half()
        torch.topk(q @ matrix.T, 10)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            torch.topk(q @ matrix.T, 10)
        torch.cuda.synchronize()
        row("search", f"torch exact fp16 n={n:,}", f"{640 / (time.perf_counter() - started):,.0f} queries/s at batch 64")


def bench_kernels(found: dict[str, bool]) -> None:
    if not (found.get("numba_cuda") and found.get("torch_cuda")):
        row("openemploi.kernels", "numba CUDA", "skipped (no numba CUDA device or no torch CUDA)")
        return
    import torch
    from numba import cuda

    from openemploi import kernels

    hidden = torch.randn(256, 32, 384, device="cuda")
    mask = torch.ones(256, 32, device="cuda", dtype=torch.int32)
    d_hidden, d_mask = cuda.as_cuda_array(hidden), cuda.as_cuda_array(mask)
    kernels.mean_pool_normalize(d_hidden, d_mask)
    cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        kernels.mean_pool_normalize(d_hidden, d_mask)
    cuda.synchronize()
    numba_s = (time.perf_counter() - started) / 20
    started = time.perf_counter()
    for _ in range(20):
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled, dim=-1)
    torch.cuda.synchronize()
    torch_s = (time.perf_counter() - started) / 20
    row(
        "openemploi.kernels",
        "mean_pool_normalize 256x32x384",
        f"numba {numba_s * 1e3:.3f} ms vs torch {torch_s * 1e3:.3f} ms ({torch_s / numba_s:.2f}x)",
    )


def attempt(label: str, fn, *args, **kwargs):
    """Run one measurement; a failure becomes a row, and the rest of the check goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        row("embed", f"{label}: error", repr(exc)[:300])
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tensorrt", action="store_true", help="also the ONNX TensorRT provider (first engine build: minutes)")
    parser.add_argument(
        "--torch-cpu", action="store_true", help="also the torch backend on the CPU (fp32): checks this script without a GPU"
    )
    args = parser.parse_args()
    budget = 6.0 if args.quick else 20.0
    gpu_batches = [1, 32, 256]
    found = providers()
    summary: dict = {
        "date": str(dt.date.today()),
        "host": socket.gethostname(),
        "machine": platform.platform(),
        "providers": found,
    }
    version = attempt("model", version_with_fp16, found)
    if version is not None:
        gpu = found.get("ort_cuda") or found.get("torch_cuda")
        probe = probe_batches(version) if gpu or args.torch_cpu else None
        reference = attempt("reference", reference_vectors, version, probe) if probe is not None else None
        cpu = attempt("onnx cpu int8", bench_onnx, version, "cpu", "int8", [1, 32], budget)
        summary["cpu_int8"] = cpu
        if args.torch_cpu:
            summary["torch_cpu_fp32"] = attempt(
                "torch cpu", bench_torch_backend, version, "cpu", "fp16", False, [1, 32], budget, probe, reference
            )
        if found.get("ort_cuda"):
            onnx_gpu = attempt("onnx cuda", bench_onnx, version, "cuda", "int8", gpu_batches, budget, probe, reference)
            summary["onnx_cuda_fp16"] = onnx_gpu
            if onnx_gpu and cpu:
                row("ratio", "onnx fp16 GPU b256 / CPU int8 b32", f"{onnx_gpu[256]['texts_per_s'] / cpu[32]['texts_per_s']:.1f}x")
            if args.tensorrt and found.get("ort_tensorrt"):
                summary["onnx_tensorrt"] = attempt(
                    "onnx tensorrt", bench_onnx, version, "cuda", "int8", gpu_batches, budget, probe, reference, tensorrt=True
                )
        else:
            row("embed", "onnx cuda fp16", "skipped (onnxruntime has no CUDA provider)")
        if found.get("torch_cuda"):
            import torch

            peak = matmul_peak(torch)
            row("mfu", "measured bf16 matmul peak", f"{peak / 1e12:.0f} TFLOP/s")
            for dtype in ("fp16", "bf16"):
                for graphs in (False, True):
                    key = f"torch_cuda_{dtype}{'_graphs' if graphs else ''}"
                    summary[key] = attempt(
                        key, bench_torch_backend, version, "cuda", dtype, graphs, gpu_batches, budget / 2, probe, reference
                    )
            for key in ("torch_cuda_fp16", "torch_cuda_fp16_graphs", "onnx_cuda_fp16"):
                if summary.get(key):
                    tokens_per_s = summary[key][256]["texts_per_s"] * 32
                    row("mfu", f"{key} b256 x 32 tokens", f"{flops_per_token(version) * tokens_per_s / peak:.1%}")
        else:
            row("embed", "torch backend cuda (fp16, bf16, CUDA graphs)", "skipped (torch sees no CUDA device)")
    bench_search(found, 200_000 if args.quick else 1_000_000)
    bench_kernels(found)
    out = REPO / "benchmarks" / "results" / f"gpu-check-{dt.date.today()}-{socket.gethostname()}.json"
    out.write_text(json.dumps({**summary, "rows": ROWS}, indent=1, default=str))
    print("\n| section | item | result |\n|---|---|---|")
    for section, item, result in ROWS:
        print(f"| {section} | {item} | {result} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

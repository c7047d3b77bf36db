"""GPU check: providers, embedding throughput and latency per backend, MFU, search, kernels.

Runs on any machine (each missing piece is reported, not fatal) and prints a short table
last. Every section has its own time budget so the whole run stays under 5 minutes.

    bash benchmarks/gpu_check.sh [--quick]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        row("providers", "onnxruntime", f"unavailable ({exc})")
    try:
        import torch

        found["torch_cuda"] = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if found["torch_cuda"] else "no CUDA"
        row("providers", "torch", f"{torch.__version__}: {name}")
    except Exception as exc:  # noqa: BLE001
        found["torch_cuda"] = False
        row("providers", "torch", f"unavailable ({exc})")
    try:
        import faiss

        found["faiss_gpus"] = faiss.get_num_gpus() > 0
        row("providers", "faiss", f"{faiss.__version__}: {faiss.get_num_gpus()} GPUs")
    except Exception as exc:  # noqa: BLE001
        found["faiss_gpus"] = False
        row("providers", "faiss", f"unavailable ({exc})")
    try:
        from numba import cuda

        found["numba_cuda"] = cuda.is_available()
        row("providers", "numba.cuda", "available" if found["numba_cuda"] else "no device")
    except Exception as exc:  # noqa: BLE001
        found["numba_cuda"] = False
        row("providers", "numba.cuda", f"unavailable ({exc})")
    return found


def version_with_fp16(found: dict[str, bool]):
    from server.modelrepo.build import BuildOptions, build_model
    from server.modelrepo.repository import ModelRepository

    repo = ModelRepository(REPO / "models")
    started = time.perf_counter()
    version = build_model(repo, MODEL, BuildOptions(fp16=True, progress=False))
    row("model", "version", f"{version.version} ({sorted(version.graphs())}, {time.perf_counter() - started:.0f}s to build or reuse)")
    fidelity = version.manifest["fidelity"]["metrics"]
    if "fp16_cosine_min" in fidelity:
        row("model", "fp16 vs fp32 cosine min", f"{fidelity['fp16_cosine_min']:.5f}")
    return version


def texts_of_tokens(tokens: int) -> str:
    return " ".join(["emploi"] * max(tokens - 6, 1))


def bench_onnx(version, device: str, precision: str, batches: list[int], budget_s: float) -> dict:
    from server.backends.onnx import OnnxBackendConfig, OnnxEncoder
    from server.modelrepo.fidelity import pad_batch
    from server.tokenize import TextKind, TextTokenizer, TokenizerConfig

    tokenizer = TextTokenizer(version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix))
    encoder = OnnxEncoder(version.graphs(), version.dim, OnnxBackendConfig(device=device, cpu_precision=precision))
    results = {}
    for batch in batches:
        tokens = tokenizer.encode([texts_of_tokens(32)] * batch, TextKind.PASSAGE)
        ids, mask = pad_batch(tokens, tokenizer.pad_id)
        encoder.encode(ids, mask)
        times = []
        deadline = time.perf_counter() + budget_s / len(batches)
        while time.perf_counter() < deadline or len(times) < 3:
            started = time.perf_counter()
            encoder.encode(ids, mask)
            times.append(time.perf_counter() - started)
        p50 = float(np.median(times))
        results[batch] = {"texts_per_s": batch / p50, "p50_ms": p50 * 1e3, "tokens": int(ids.shape[1])}
        row("embed", f"onnx {encoder.info.device} {encoder.info.precision} b{batch}", f"{batch / p50:,.0f} texts/s, p50 {p50 * 1e3:.2f} ms")
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


def bench_torch(version, batches: list[int], budget_s: float) -> dict:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(version.checkpoint_path, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    results = {}
    for batch in batches:
        ids = torch.randint(5, 1000, (batch, 32), device="cuda")
        mask = torch.ones_like(ids)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
            times = []
            deadline = time.perf_counter() + budget_s / len(batches)
            while time.perf_counter() < deadline or len(times) < 3:
                started = time.perf_counter()
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                torch.nn.functional.normalize(pooled, dim=-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        p50 = float(np.median(times))
        results[batch] = {"texts_per_s": batch / p50, "p50_ms": p50 * 1e3}
        row("embed", f"torch cuda fp16 b{batch}", f"{batch / p50:,.0f} texts/s, p50 {p50 * 1e3:.2f} ms")
    return results


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
        row("kernels", "numba CUDA", "skipped (no numba CUDA device or no torch CUDA)")
        return
    import torch
    from numba import cuda

    import kernels

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
    row("kernels", "mean_pool_normalize 256x32x384", f"numba {numba_s * 1e3:.3f} ms vs torch {torch_s * 1e3:.3f} ms ({torch_s / numba_s:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    budget = 6.0 if args.quick else 20.0
    found = providers()
    summary: dict = {"date": str(dt.date.today()), "host": socket.gethostname(), "machine": platform.platform(), "providers": found}
    try:
        version = version_with_fp16(found)
        cpu = bench_onnx(version, "cpu", "int8", [1, 32], budget)
        summary["cpu_int8"] = cpu
        if found.get("ort_cuda"):
            gpu = bench_onnx(version, "cuda", "int8", [1, 32, 256], budget)
            summary["onnx_cuda_fp16"] = gpu
            row("ratio", "onnx fp16 GPU b256 / CPU int8 b32", f"{gpu[256]['texts_per_s'] / cpu[32]['texts_per_s']:.1f}x")
        if found.get("torch_cuda"):
            import torch

            peak = matmul_peak(torch)
            row("mfu", "measured bf16 matmul peak", f"{peak / 1e12:.0f} TFLOP/s")
            torch_results = bench_torch(version, [1, 32, 256], budget)
            summary["torch_cuda_fp16"] = torch_results
            tokens_per_s = torch_results[256]["texts_per_s"] * 32
            row("mfu", "torch fp16 b256 x 32 tokens", f"{flops_per_token(version) * tokens_per_s / peak:.1%}")
            if "onnx_cuda_fp16" in summary:
                onnx_tps = summary["onnx_cuda_fp16"][256]["texts_per_s"] * 32
                row("mfu", "onnx fp16 b256 x 32 tokens", f"{flops_per_token(version) * onnx_tps / peak:.1%}")
    except Exception as exc:  # noqa: BLE001 - the table must still print
        row("embed", "error", repr(exc)[:200])
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

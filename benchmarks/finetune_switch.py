"""The switch to a fine-tuned model on a live server: LoadModel under traffic, Reembed `rome`, MatchOccupation.

Starts `openemploi serve` with the ROME collection (indexed with the default model at the first
run, kept in var/finetune-switch-collections), sends MatchOccupation and Embed calls from
`--clients` threads the whole time, loads the fine-tuned model (LoadModel), re-embeds `rome` with
it (Reembed), and checks: no call failed, and MatchOccupation then answers with the new model.
Exit status 0 only when all of that holds.

    .venv/bin/python benchmarks/finetune_switch.py --model e5-small-rome [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import grpc

from openemploi.build.finetune_data import load_queries
from openemploi.testing.launcher import ServerProcess
from openemploi.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    index_pb2,
    index_pb2_grpc,
    match_pb2,
    match_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[1]


class Traffic:
    """Client threads calling MatchOccupation and Embed until stopped; every answer and failure counted."""

    def __init__(self, address: str, queries: list[str], clients: int) -> None:
        self.channel = grpc.insecure_channel(address)
        self.queries = queries
        self.ok: dict[str, int] = {}
        self.models: set[tuple[str, str]] = set()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, worker: int) -> None:
        match = match_pb2_grpc.MatchServiceStub(self.channel)
        embed = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        i = worker
        while not self._stop.is_set():
            text = self.queries[i % len(self.queries)]
            i += 1
            try:
                if i % 2:
                    response = match.MatchOccupation(match_pb2.MatchOccupationRequest(text=text, k=5), timeout=60)
                    key = "MatchOccupation"
                    with self._lock:
                        self.models.add((response.model, response.model_version))
                else:
                    embed.Embed(embedding_pb2.EmbedRequest(texts=[text], kind=embedding_pb2.QUERY), timeout=60)
                    key = "Embed"
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            with self._lock:
                self.ok[key] = self.ok.get(key, 0) + 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the fine-tuned model (built, in models/)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--collections", type=Path, default=REPO / "var" / "finetune-switch-collections")
    args = parser.parse_args()
    queries = [q["query"] for q in load_queries(REPO / "benchmarks" / "data" / "rome_dev.jsonl") if q["split"] == "heldout"]
    server = ServerProcess(
        args.collections,
        cwd=REPO,
        env={"OPENEMPLOI_ROME_COLLECTION": "true", "OPENEMPLOI_SKILLS_COLLECTION": "false"},
        ready_timeout_s=3600,
    )
    print(f"starting a server with the rome collection in {args.collections} (the first run indexes it)...")
    server.start()
    report: dict = {"model": args.model}
    try:
        channel = grpc.insecure_channel(server.address)
        admin = models_pb2_grpc.ModelServiceStub(channel)
        index = index_pb2_grpc.IndexServiceStub(channel)
        with Traffic(server.address, queries, args.clients) as traffic:
            time.sleep(5)
            started = time.perf_counter()
            loaded = admin.LoadModel(models_pb2.LoadModelRequest(name=args.model), timeout=600).model
            report["load_s"] = round(time.perf_counter() - started, 1)
            report["loaded_version"] = loaded.current_version
            started = time.perf_counter()
            info = index.Reembed(index_pb2.ReembedRequest(collection="rome", model=args.model), timeout=3600).collection
            report["reembed_s"] = round(time.perf_counter() - started, 1)
            report["rome_after"] = f"{info.model}/{info.model_version} ({info.size} entries)"
            time.sleep(5)
        match = match_pb2_grpc.MatchServiceStub(channel).MatchOccupation(
            match_pb2.MatchOccupationRequest(text=queries[0], k=3), timeout=60
        )
        report["match_model_after"] = f"{match.model}/{match.model_version}"
        report["calls_ok"] = traffic.ok
        report["calls_failed"] = len(traffic.failures)
        report["failures"] = traffic.failures[:10]
        report["match_models_seen"] = sorted(f"{m}/{v}" for m, v in traffic.models)
        channel.close()
    finally:
        server.stop()
    print(json.dumps(report, indent=1, ensure_ascii=False))
    passed = report["calls_failed"] == 0 and report["match_model_after"] == f"{args.model}/{report['loaded_version']}"
    print("switch check:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`openemploi` command line: serve, embed (a gRPC client), health, collections, models, tokens."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, ServerConfig, load_config
from .logs import configure_logging

MALLOC_ARENAS = 2


def _limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's per-thread malloc arenas, unless MALLOC_ARENA_MAX is set.

    Each executor thread that builds an ONNX session gets its own arena, and glibc keeps freed
    memory there: without a cap, every model (re)load or failed load left 300-900 MB resident
    (benchmarks/chaos.py, failed-swap fault). A no-op outside glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # -8 is M_ARENA_MAX in malloc.h
    except (OSError, AttributeError):
        pass


def _server_config(args: argparse.Namespace, overrides: dict) -> ServerConfig | None:
    """The config `serve` and `index-catalogues` start from, logging set up; None (after saying why) when invalid."""
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"openemploi: {exc}", file=sys.stderr)
        return None
    configure_logging(config.log_level, config.log_json)
    _limit_malloc_arenas()
    return config


def _serve(args: argparse.Namespace) -> int:
    from .app import serve_forever

    overrides = {"host": args.host, "port": args.port, "http_port": args.http_port, "model_repository": args.model_repository}
    if args.models:
        overrides["models"] = args.models.split(",")
    config = _server_config(args, overrides)
    if config is None:
        return 2
    if args.ray:
        return _serve_ray(args, config)
    try:
        asyncio.run(serve_forever(config))
    except ConfigError as exc:  # tokens file or TLS files, read at start
        print(f"openemploi: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve_ray(args: argparse.Namespace, config: ServerConfig) -> int:
    """The same services through Ray Serve; `openemploi.scaleout` (and Ray) is imported only here."""
    from .scaleout import RayOptions
    from .scaleout.app import serve_forever as serve_ray

    try:
        options = RayOptions(
            address=args.ray_address,
            grpc_port=config.port,
            http_port=config.http_port,
            embed_replicas=args.embed_replicas,
            max_embed_replicas=args.max_embed_replicas,
            shards=args.shards,
            num_gpus_per_replica=args.gpus_per_replica,
        )
        asyncio.run(serve_ray(options, config))
    except (ConfigError, ValueError) as exc:
        print(f"openemploi: {exc}", file=sys.stderr)
        return 2
    return 0


def _index_catalogues(args: argparse.Namespace) -> int:
    """Start as `serve` would, on a private port, until ready, then stop: the catalogue collections
    `serve` indexes at its first start (rome, ...) are then on disk, and later starts only open them."""
    from .app import start_server

    overrides = {"model_repository": args.model_repository, "host": "127.0.0.1", "port": 0, "metrics": False, "http": False}
    config = _server_config(args, overrides)
    if config is None:
        return 2

    async def index() -> list[str]:
        running = await start_server(config)
        names = running.collections.names()
        await running.stop(0)
        return names

    try:
        names = asyncio.run(index())
    except ConfigError as exc:
        print(f"openemploi: {exc}", file=sys.stderr)
        return 2
    print(f"collections in {config.collections_dir}: {', '.join(sorted(names)) or '(none)'}")
    return 0


TOKEN_ENV = "OPENEMPLOI_TOKEN"


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"openemploi: cannot read {what} {path}: {exc.strerror or exc}") from exc


def _channel(args: argparse.Namespace):
    """A channel to a running server: TLS when --tls-ca is given (plus a client certificate for mTLS)."""
    import grpc

    ca = _read(args.tls_ca, "--tls-ca")
    if ca is None:
        if args.tls_cert or args.tls_key:
            raise SystemExit("openemploi: --tls-cert/--tls-key need --tls-ca (the CA that signed the server certificate)")
        return grpc.insecure_channel(args.address)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("openemploi: --tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(ca, _read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def _auth(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """Call metadata with the bearer token of --token or $OPENEMPLOI_TOKEN (plaintext or TLS alike)."""
    token = args.token or os.environ.get(TOKEN_ENV)
    return (("authorization", f"Bearer {token}"),) if token else ()


def _add_client_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--address", default="127.0.0.1:50051")
    command.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    command.add_argument("--tls-ca", default=None, help="PEM CA of the server certificate: connect with TLS")
    command.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    command.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    command.add_argument("--tls-server-name", default=None, help="name to check in the server certificate (default: the host)")


def _embed(args: argparse.Namespace) -> int:
    import grpc

    from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

    kind = embedding_pb2.QUERY if args.kind == "query" else embedding_pb2.PASSAGE
    request = embedding_pb2.EmbedRequest(texts=args.texts, model=args.model, kind=kind, truncate=args.truncate)
    with _channel(args) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        try:
            response = stub.Embed(request, timeout=args.timeout, metadata=_auth(args))
        except grpc.RpcError as exc:
            print(f"openemploi: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for text, embedding, tokens in zip(args.texts, response.embeddings, response.token_counts):
        values = list(embedding.values)
        print(
            json.dumps(
                {"text": text, "tokens": tokens, "dim": len(values), "vector": [round(v, 6) for v in values]}, ensure_ascii=False
            )
        )
    print(f"# model {response.model} version {response.model_version}", file=sys.stderr)
    return 0


def _collections(args: argparse.Namespace) -> int:
    """Collections of a running server: list them, or re-embed one with another model."""
    import grpc

    from openemploi.v1 import index_pb2, index_pb2_grpc

    with _channel(args) as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        try:
            if args.collections_command == "list":
                infos = stub.ListCollections(index_pb2.ListCollectionsRequest(), timeout=30, metadata=_auth(args)).collections
            else:
                print(
                    f"re-embedding {args.name} with {args.model or 'the default model'} (the server logs progress)...",
                    file=sys.stderr,
                )
                infos = [
                    stub.Reembed(
                        index_pb2.ReembedRequest(collection=args.name, model=args.model),
                        timeout=args.timeout,
                        metadata=_auth(args),
                    ).collection
                ]
        except grpc.RpcError as exc:
            print(f"openemploi: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for info in infos:
        print(f"{info.name}\t{info.size} docs\t{info.model}/{info.model_version}\t{info.index_kind} on {info.device}")
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server's gRPC health service says SERVING (for Docker and probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=_auth(args))
                .status
            )
        except grpc.RpcError as exc:
            print(f"openemploi: health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


TOKENS_FILE_ENV = "OPENEMPLOI_SECURITY_TOKENS_FILE"


def _tokens(args: argparse.Namespace) -> int:
    from .security import TokenStore, append_token

    path = args.file or os.environ.get(TOKENS_FILE_ENV)
    if not path:
        print(f"openemploi: give --file or set {TOKENS_FILE_ENV}", file=sys.stderr)
        return 2
    try:
        if args.tokens_command == "list":
            for stored in TokenStore.load(Path(path), allow_empty=True).tokens:
                print(f"{stored.name}\t{','.join(sorted(stored.scopes))}")
            return 0
        token = append_token(Path(path), args.name, args.scopes.split(","))
    except ConfigError as exc:
        print(f"openemploi: {exc}", file=sys.stderr)
        return 2
    print(f"# token {args.name!r} added to {path}; it is shown only this once (the file keeps its SHA-256)", file=sys.stderr)
    print(token)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .build.build import BuildError, BuildOptions, build_model
    from .runtime.repository import ModelNotFound, ModelRepository

    repo = ModelRepository(Path(args.model_repository))
    if args.models_command == "list":
        for name in repo.names():
            versions = repo.versions(name)
            print(f"{name}: " + (", ".join(v.version for v in versions) if versions else "(not built)"))
        return 0
    configure_logging("WARNING", json_lines=False)
    if args.models_command == "finetune":
        from .build import finetune_cli

        return finetune_cli.run(args)
    if args.models_command == "add":
        from .build.add import AddOptions, add_model
        from .runtime.spec import SpecError

        try:
            folder = add_model(
                Path(args.model_repository),
                Path(args.path),
                AddOptions(args.name, args.pooling or "", args.query_prefix, args.passage_prefix, args.allow_pickle, args.force),
            )
        except SpecError as exc:
            print(f"openemploi: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {folder / 'model.toml'}; building it now")
    try:
        built = build_model(repo, args.name, BuildOptions(force=args.force, fp16=args.fp16, progress=not args.no_progress))
    except (BuildError, ModelNotFound) as exc:
        print(f"openemploi: build failed: {exc}", file=sys.stderr)
        return 1
    metrics = built.manifest["fidelity"]["metrics"]
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"{built.name} version {built.version} ready in {built.folder}")
    print(json.dumps(summary, indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="openemploi", description="French embedding and job matching service")
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, default=None, help="TOML config file")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--http-port", type=int, default=None, help="the HTTP API's port (config http_port; 0: a free one)")
    serve.add_argument("--model-repository", default=None)
    serve.add_argument("--models", default=None, help="comma-separated models to load at start")
    serve.add_argument("--ray", action="store_true", help="serve through Ray Serve (gRPC proxy on --port)")
    serve.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")
    serve.add_argument("--embed-replicas", type=int, default=1, help="--ray: Embedder replicas (the autoscaler's floor)")
    serve.add_argument("--max-embed-replicas", type=int, default=0, help="--ray: autoscale up to this many (0: fixed)")
    serve.add_argument("--gpus-per-replica", type=float, default=0.0, help="--ray: GPUs per Embedder replica")
    serve.add_argument("--shards", type=int, default=2, help="--ray: CollectionShard deployments (0: in the gateway)")
    serve.set_defaults(func=_serve)

    catalogues = sub.add_parser("index-catalogues", help="index the catalogue collections serve keeps (rome, ...), then exit")
    catalogues.add_argument("--config", type=Path, default=None, help="TOML config file")
    catalogues.add_argument("--model-repository", default=None)
    catalogues.set_defaults(func=_index_catalogues)

    embed = sub.add_parser("embed", help="embed texts through a running server")
    embed.add_argument("texts", nargs="+")
    _add_client_flags(embed)
    embed.add_argument("--kind", choices=["query", "passage"], default="passage")
    embed.add_argument("--model", default="")
    embed.add_argument("--truncate", action="store_true")
    embed.add_argument("--timeout", type=float, default=30.0)
    embed.set_defaults(func=_embed)

    collections = sub.add_parser("collections", help="list or re-embed the collections of a running server")
    _add_client_flags(collections)
    csub = collections.add_subparsers(dest="collections_command", required=True)
    csub.add_parser("list", help="list collections")
    reembed = csub.add_parser("reembed", help="re-embed a collection with another model, then switch")
    reembed.add_argument("name")
    reembed.add_argument("--model", default="", help="default: the server's default model")
    reembed.add_argument("--timeout", type=float, default=24 * 3600.0)
    collections.set_defaults(func=_collections)

    health = sub.add_parser("health", help="check a running server's gRPC health (exit 0 when SERVING)")
    _add_client_flags(health)
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_health)

    models = sub.add_parser("models", help="build and list models of the repository")
    models.add_argument("--model-repository", default="models")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="export, quantise and gate-check a model")
    build.add_argument("name")
    build.add_argument("--force", action="store_true", help="rebuild even if this version exists")
    build.add_argument(
        "--fp16", action=argparse.BooleanOptionalAction, default=None, help="build the fp16 graph (default: only with CUDA)"
    )
    build.add_argument("--no-progress", action="store_true")
    msub.add_parser("list", help="list models and built versions")
    add = msub.add_parser("add", help="declare a local Hugging Face checkpoint folder, then build it")
    add.add_argument("path", help="checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    add.add_argument("--name", required=True)
    add.add_argument("--pooling", choices=["mean", "cls"], default=None, help="default: from 1_Pooling/config.json, else mean")
    add.add_argument("--query-prefix", default="")
    add.add_argument("--passage-prefix", default="")
    add.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (unsafe: runs code on load)")
    add.add_argument("--force", action="store_true")
    add.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None)
    add.add_argument("--no-progress", action="store_true")
    from .build import finetune_cli

    finetune_cli.add_parser(msub)
    models.set_defaults(func=_models)

    tokens = sub.add_parser("tokens", help="bearer tokens of the tokens file (security.tokens_file)")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True)
    new = tsub.add_parser("new", help="make a token, append its SHA-256 to the file, print the token once")
    new.add_argument("--name", required=True, help="shown in logs instead of the token")
    new.add_argument("--scopes", required=True, help="comma-separated: embed, search, ingest, admin (admin implies all)")
    listing = tsub.add_parser("list", help="names and scopes (the file holds no tokens, only their hashes)")
    for command in (new, listing):
        command.add_argument("--file", default=None, help=f"tokens file (default: ${TOKENS_FILE_ENV})")
    tokens.set_defaults(func=_tokens)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Server configuration: defaults < TOML file < OPENEMPLOI_* environment < CLI flags.

Built once at start into frozen dataclasses; nothing reads the environment later.
Environment keys are the field names upper-cased, with the section as a prefix
for nested tables: OPENEMPLOI_PORT, OPENEMPLOI_BATCHING_MAX_BATCH_SIZE,
OPENEMPLOI_BACKEND_INTRA_OP_THREADS.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .backends.base import parse_option
from .backends.options import BackendConfig
from .batching import BatcherConfig

ENV_PREFIX = "OPENEMPLOI_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LimitsConfig:
    """Every bound a request meets; refusals name the key that set it so operators know what to raise."""

    max_texts_per_request: int = 1024
    max_message_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 200_000
    stream_window: int = 8  # requests of one EmbedStream processed concurrently
    max_k: int = 2048  # results per Search / MatchProfile; at most the index's depth (index.vectors.MAX_K)
    max_stream_requests: int = 100_000  # requests in one EmbedStream call; open a new stream beyond
    max_upsert_documents: int = 4096  # documents in one Upsert
    max_ids_per_request: int = 4096  # ids in one Get / Delete
    match_max_text_chars: int = 20_000  # MatchOccupation: a job description or CV line, not a document
    match_max_k: int = 100  # MatchOccupation: more than 100 ROME codes is no longer a match
    max_request_chars: int = 4_000_000  # characters in all texts of one Embed: about 5 s of tokenising on one core
    tokenize_threads: int = 2  # worker threads that tokenise requests, off the event loop; shared by every model
    max_query_terms: int = 256  # lexical terms of a hybrid query / MatchOccupation: the first ones kept, the rest dropped
    max_filter_terms: int = 256  # filter values + skills_all + skills_any of one Search / MatchProfile (SQLite's tree)
    index_workers: int = 4  # threads for index and SQLite work, apart from embedding's
    max_index_queue: int = 256  # index calls waiting for a worker; beyond: RESOURCE_EXHAUSTED, retry with backoff
    skills_max_k: int = 100  # ExtractSkills / SuggestTransitions results: beyond 100 skills or jobs nobody reads on
    skills_max_text_chars: int = 20_000  # ExtractSkills / SuggestTransitions / DescribeNeeds text: a long CV or ad
    skills_max_clauses: int = 200  # clauses of one text (+ free skill phrases), embedded in one batch: ~1 s on 2 cores

    def __post_init__(self) -> None:
        for limit in dataclasses.fields(self):
            if getattr(self, limit.name) < 1:
                raise ValueError(f"limits.{limit.name} must be at least 1, got {getattr(self, limit.name)}")
        # Imported here, not at the top: it pulls in faiss, which commands other than serve never need.
        from .index.vectors import MAX_K

        if self.max_k > MAX_K:
            raise ValueError(f"limits.max_k must be at most {MAX_K} (the index searches no deeper), got {self.max_k}")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS and bearer tokens; all unset means a plaintext, open server (start logs a warning)."""

    tokens_file: Path | None = None  # TOML [[tokens]] entries (name, sha256, scopes); set: every RPC but health needs a token
    tls_cert: Path | None = None  # PEM server certificate chain
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("security.tls_cert and security.tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("security.tls_client_ca (mTLS) needs TLS: set security.tls_cert and security.tls_key")


class TraceExporter(StrEnum):
    """Where finished spans go (`[tracing] exporter`)."""

    OTLP = "otlp"  # OTLP over gRPC to `tracing.endpoint`: an OpenTelemetry collector, Jaeger, Tempo
    CONSOLE = "console"  # one JSON object per span on stdout: to look at spans without a collector


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry spans per request; off: no tracer provider, no interceptor, no span objects."""

    enabled: bool = False
    exporter: TraceExporter = TraceExporter.OTLP
    endpoint: str = "http://127.0.0.1:4317"  # OTLP/gRPC collector; http:// sends in plaintext, https:// with TLS
    service_name: str = "openemploi"  # `service.name` of every span
    sample_ratio: float = 1.0  # share of new traces recorded; a caller's traceparent decides for its own trace

    def __post_init__(self) -> None:
        object.__setattr__(self, "exporter", parse_option(TraceExporter, self.exporter, "tracing.exporter"))
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing.sample_ratio must be between 0 and 1, got {self.sample_ratio}")
        if not self.service_name.strip():
            raise ValueError("tracing.service_name must not be empty")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    model_repository: Path = Path("models")
    default_model: str = "multilingual-e5-small"
    models: tuple[str, ...] = ("multilingual-e5-small",)
    grace_period_s: float = 10.0
    log_level: str = "INFO"
    log_json: bool = True
    reflection: bool = True
    collections_dir: Path = Path("var/collections")
    rome_collection: bool = True  # index the ROME catalogue into collection "rome" at start
    skills_collection: bool = True  # index ESCO skills into "esco_skills" at start (SkillsService); needs rome_collection
    progress: bool = True  # progress bars for first-start indexing
    metrics: bool = True  # Prometheus endpoint on its own port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9100  # 0 picks a free port
    http: bool = True  # the HTTP API (OpenAI-compatible embeddings, JSON routes) in the same process, on `host`
    http_port: int = 8080  # 0 picks a free port
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _coerce(value: object, annotation: object, key: str) -> object:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and type(None) in typing.get_args(annotation):  # X | None: leave the key out for None
            if value is None:
                return None
            if str(value).strip() == "":
                # An empty value is a template left unfilled; reading it as unset would start a server open.
                raise ConfigError(f"config {key} is empty: give a value, or remove the key to leave it unset")
            return _coerce(value, options[0], key)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if annotation in (int, float) and isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if annotation is int:
            if isinstance(value, float):
                raise TypeError("not an integer")
            return int(str(value))  # a TOML integer or an environment string
        if annotation is float:
            return float(str(value))
        if annotation is Path:
            return Path(str(value))
        if annotation is str:
            return str(value)
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return tuple(str(v).strip() for v in items)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {key}: cannot read {value!r} as {annotation}") from exc
    return value


def _build(cls: type, values: Mapping[str, object], env: Mapping[str, str], env_prefix: str, where: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            section = values.get(f.name, {})
            if not isinstance(section, Mapping):
                raise ConfigError(f"{where}.{f.name} must be a table")
            kwargs[f.name] = _build(annotation, section, env, f"{env_prefix}{f.name.upper()}_", f"{where}.{f.name}")
            continue
        env_key = f"{env_prefix}{f.name.upper()}"
        if env_key in env:
            kwargs[f.name] = _coerce(env[env_key], annotation, env_key)
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], annotation, f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServerConfig:
    """Merge a TOML file, OPENEMPLOI_* variables and CLI overrides (dotted keys allowed)."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        table = values
        *parents, leaf = key.split(".")
        for parent in parents:
            table = table.setdefault(parent, {})  # type: ignore[assignment]
        table[leaf] = value
    # CLI flags beat the environment: drop env keys the CLI set.
    environment = dict(os.environ if env is None else env)
    for key, value in (overrides or {}).items():
        if value is not None:
            environment.pop(ENV_PREFIX + key.replace(".", "_").upper(), None)
    config = _build(ServerConfig, values, environment, ENV_PREFIX, "config")
    assert isinstance(config, ServerConfig)
    return config

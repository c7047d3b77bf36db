"""Who may call what: bearer tokens with scopes (a gRPC server interceptor) and TLS credentials.

Tokens are never stored: the tokens file keeps the SHA-256 of each one, so a leaked file grants
nothing. A presented token is hashed and compared with every stored hash in constant time.
Health and reflection stay open so probes and grpcurl work without a secret. An RPC that has
no entry in RPC_SCOPES is refused: a new method is closed until someone decides who may call it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from .config import ConfigError, SecurityConfig

log = logging.getLogger(__name__)

EMBED, SEARCH, INGEST, ADMIN = "embed", "search", "ingest", "admin"
SCOPES = (EMBED, SEARCH, INGEST, ADMIN)  # admin implies every other scope

RPC_SCOPES: Mapping[str, str] = {
    "/openemploi.v1.EmbeddingService/Embed": EMBED,
    "/openemploi.v1.EmbeddingService/EmbedStream": EMBED,
    "/openemploi.v1.IndexService/Search": SEARCH,
    "/openemploi.v1.IndexService/Get": SEARCH,
    "/openemploi.v1.IndexService/ListCollections": SEARCH,
    "/openemploi.v1.MatchService/MatchOccupation": SEARCH,
    "/openemploi.v1.MatchService/MatchProfile": SEARCH,
    "/openemploi.v1.ModelService/ListModels": SEARCH,
    "/openemploi.v1.SkillsService/ExtractSkills": SEARCH,
    "/openemploi.v1.SkillsService/GetOccupation": SEARCH,
    "/openemploi.v1.SkillsService/SuggestTransitions": SEARCH,
    "/openemploi.v1.SkillsService/DescribeNeeds": SEARCH,
    "/openemploi.v1.IndexService/Upsert": INGEST,
    "/openemploi.v1.IndexService/Delete": INGEST,
    "/openemploi.v1.IndexService/CreateCollection": ADMIN,
    "/openemploi.v1.IndexService/DropCollection": ADMIN,
    "/openemploi.v1.IndexService/Reembed": ADMIN,
    "/openemploi.v1.ModelService/LoadModel": ADMIN,
    "/openemploi.v1.ModelService/UnloadModel": ADMIN,
    "/openemploi.v1.ModelService/SetDefault": ADMIN,
}
# Writes and the request field naming their collection: on a collection the server manages (the ROME
# catalogue), only an admin token may make them, whatever scope the RPC itself needs.
COLLECTION_WRITES: Mapping[str, str] = {
    "/openemploi.v1.IndexService/Upsert": "collection",
    "/openemploi.v1.IndexService/Delete": "collection",
    "/openemploi.v1.IndexService/DropCollection": "name",
    "/openemploi.v1.IndexService/Reembed": "collection",
}
OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"})

TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PREFIX = "oe_"
MISSING_TOKEN = "missing bearer token: send metadata 'authorization: Bearer <token>'"
ERROR_DOMAIN = "openemploi.v1"  # ErrorInfo.domain, as the API's own errors


class TokenFileError(ConfigError):
    """The tokens file cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class Token:
    name: str
    sha256: bytes
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_scopes(scopes: Iterable[str], where: str) -> frozenset[str]:
    parsed = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(parsed - set(SCOPES))
    if unknown:
        raise TokenFileError(f"{where}: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
    if not parsed:
        raise TokenFileError(f"{where}: no scopes (known: {', '.join(SCOPES)})")
    return parsed


class TokenStore:
    """The tokens of one file, looked up by hashing the presented token."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tuple(tokens)

    @classmethod
    def parse(cls, text: str, where: str) -> TokenStore:
        """Read `[[tokens]] name, sha256, scopes` entries; every mistake is a TokenFileError naming the entry."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TokenFileError(f"{where}: not valid TOML ({exc})") from exc
        unknown = set(data) - {"tokens"}
        if unknown:
            raise TokenFileError(f"{where}: unknown keys {sorted(unknown)}; the file holds [[tokens]] entries only")
        entries = data.get("tokens", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TokenFileError(f"{where}: 'tokens' must be an array of tables ([[tokens]])")
        tokens: list[Token] = []
        names: set[str] = set()
        digests: set[bytes] = set()
        for i, entry in enumerate(entries):
            label = f"{where}: tokens[{i}]"
            extra = set(entry) - {"name", "sha256", "scopes"}
            if extra:
                raise TokenFileError(f"{label}: unknown keys {sorted(extra)} (known: name, sha256, scopes)")
            name = entry.get("name")
            if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
                raise TokenFileError(f"{label}: name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {name!r}")
            label = f"{label} ({name!r})"
            if name in names:
                raise TokenFileError(f"{label}: name used twice")
            hex_digest = entry.get("sha256")
            if not isinstance(hex_digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hex_digest):
                raise TokenFileError(f"{label}: sha256 must be 64 hex characters (the SHA-256 of the token), got {hex_digest!r}")
            digest = bytes.fromhex(hex_digest)
            if digest in digests:
                raise TokenFileError(f"{label}: same sha256 as an earlier entry")
            scopes = entry.get("scopes")
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise TokenFileError(f'{label}: scopes must be a list of strings, e.g. ["embed", "search"]')
            tokens.append(Token(name, digest, parse_scopes(scopes, label)))
            names.add(name)
            digests.add(digest)
        return cls(tokens)

    @classmethod
    def load(cls, path: Path, allow_empty: bool = False) -> TokenStore:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"security.tokens_file {path}: cannot read it ({exc.strerror or exc})") from exc
        store = cls.parse(text, f"tokens file {path}")
        if not store.tokens and not allow_empty:
            raise TokenFileError(
                f"tokens file {path} has no [[tokens]] entries: nobody could call; add one with `openemploi tokens new`"
            )
        return store

    def lookup(self, token: str) -> Token | None:
        """Compare with every stored hash, without stopping at a match, so timing says nothing about which."""
        digest = token_digest(token)
        found = None
        for entry in self.tokens:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


def append_token(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Make a random token, append its hash to `path` (created 0600), return the token (shown once)."""
    path = Path(path)
    existing = TokenStore.load(path, allow_empty=True) if path.exists() else TokenStore(())
    if not TOKEN_NAME.fullmatch(name):
        raise TokenFileError(f"token name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {name!r}")
    if any(t.name == name for t in existing.tokens):
        raise TokenFileError(f"tokens file {path} already has a token named {name!r}")
    parsed = parse_scopes(scopes, f"token {name!r}")
    # The prefix keeps a token from starting with "-" (a CLI would read it as an option)
    # and lets secret scanners recognise a leaked one.
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    scope_list = ", ".join('"' + s + '"' for s in SCOPES if s in parsed)  # validated names: no quoting needed
    entry = f'\n[[tokens]]\nname = "{name}"\nsha256 = "{token_digest(token).hex()}"\nscopes = [{scope_list}]\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(entry)
    return token


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


def bearer_token(details: grpc.HandlerCallDetails) -> str | None:
    """The token of `authorization: Bearer <token>` (scheme case-insensitive), None when absent or malformed."""
    return parse_bearer(_metadata(details, "authorization"))


def parse_bearer(value: str | None) -> str | None:
    """The token of an `authorization` value (gRPC metadata or HTTP header), None when absent or malformed."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: its status, and a stable reason (the ErrorInfo reason of the API's errors)."""

    code: grpc.StatusCode
    message: str
    reason: str

    def trailing_metadata(self, request_id: str) -> tuple[tuple[str, str | bytes], ...]:
        details = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        packed = any_pb2.Any()
        packed.Pack(details)
        rich = status_pb2.Status(code=self.code.value[0], message=self.message, details=[packed])
        return (("x-request-id", request_id), ("grpc-status-details-bin", rich.SerializeToString()))


def _refusing(handler: grpc.RpcMethodHandler, refusal: Refusal, request_id: str) -> grpc.RpcMethodHandler:
    """The same kind of handler, that aborts at once and never parses the request."""

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(refusal.trailing_metadata(request_id))
        await context.abort(refusal.code, refusal.message)

    async def unary_response(request_or_iterator, context):
        await refuse(context)

    async def stream_response(request_or_iterator, context):
        await refuse(context)
        yield  # pragma: no cover - abort raises; this makes the function an async generator

    fields = {
        "unary_unary": unary_response,
        "stream_unary": unary_response,
        "unary_stream": stream_response,
        "stream_stream": stream_response,
    }
    for kind, behaviour in fields.items():
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: behaviour}, request_deserializer=None)
    return handler


def _guarding_managed(
    handler: grpc.RpcMethodHandler, guard: AuthInterceptor, method: str, caller: Token, request_id: str
) -> grpc.RpcMethodHandler:
    """The same unary handler, refusing a parsed request that writes to a managed collection.

    The collection is in the request body, which only the handler parses: the check waits for it.
    """
    behaviour = handler.unary_unary

    async def guarded(request, context):
        refusal = guard.check_write(method, request, caller, request_id)
        if refusal is not None:
            context.set_trailing_metadata(refusal.trailing_metadata(request_id))
            await context.abort(refusal.code, refusal.message)
        return await behaviour(request, context)

    return handler._replace(unary_unary=guarded)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer token -> scope check before any servicer code runs. Logs the token's name, never the token.

    Collections in `managed` (the server's own catalogue) are read-only to every token but admin.
    """

    def __init__(self, store: TokenStore, scopes: Mapping[str, str] = RPC_SCOPES, managed: frozenset[str] = frozenset()) -> None:
        self._store = store
        self._scopes = scopes
        self._managed = managed

    def authorize(self, method: str, token: str | None, request_id: str) -> Token | Refusal:
        """The caller of `method` (a gRPC path) with `token`, or why it is refused (logged). Shared by gRPC and HTTP."""
        caller: Token | None = None
        if token is None:
            refusal = Refusal(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN, "MISSING_TOKEN")
        elif (caller := self._store.lookup(token)) is None:
            refusal = Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token", "UNKNOWN_TOKEN")
        else:
            scope = self._scopes.get(method)
            if scope is None:
                message = f"{method} has no scope in server/security.py RPC_SCOPES; refused for every caller"
                refusal = Refusal(grpc.StatusCode.PERMISSION_DENIED, message, "METHOD_CLOSED")
            elif not caller.allows(scope):
                message = f"token {caller.name!r} lacks scope {scope!r}, needed for {method}"
                refusal = Refusal(grpc.StatusCode.PERMISSION_DENIED, message, "SCOPE_MISSING")
            else:
                log.debug("%s called by token %s", method, caller.name, extra={"request_id": request_id, "caller": caller.name})
                return caller
        log.warning(
            "%s refused: %s",
            method,
            refusal.code.name,
            extra={"request_id": request_id, "caller": caller.name if caller else "-", "reason": refusal.message},
        )
        return refusal

    def guards_writes(self, method: str, caller: Token) -> bool:
        """Whether `method`'s request must pass `check_write` once parsed."""
        return method in COLLECTION_WRITES and bool(self._managed) and not caller.allows(ADMIN)

    def check_write(self, method: str, request: object, caller: Token, request_id: str) -> Refusal | None:
        """A write by `caller` to a managed collection is refused (logged); None lets it through."""
        field = COLLECTION_WRITES.get(method)
        name = getattr(request, field, None) if field else None  # an unparsed request has none: the servicer refuses it
        if name not in self._managed or caller.allows(ADMIN):
            return None
        message = (
            f"collection {name!r} is managed by the server (config rome_collection): "
            f"token {caller.name!r} may not change it, only a token with scope {ADMIN!r}"
        )
        log.warning("write refused: %s", message, extra={"request_id": request_id, "caller": caller.name})
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, message, "MANAGED_COLLECTION")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        service = method.lstrip("/").rpartition("/")[0]
        handler = await continuation(handler_call_details)
        if handler is None or service in OPEN_SERVICES:
            return handler
        rid = (_metadata(handler_call_details, "x-request-id") or uuid.uuid4().hex)[:128]
        caller = self.authorize(method, bearer_token(handler_call_details), rid)
        if isinstance(caller, Refusal):
            return _refusing(handler, caller, rid)
        if not self.guards_writes(method, caller) or handler.unary_unary is None:
            return handler
        return _guarding_managed(handler, self, method, caller, rid)


def require_private(path: Path) -> None:
    """Refuse a tokens file other accounts may read or change: its hashes can be brute-forced offline, or a token added."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TokenFileError(f"security.tokens_file {path}: cannot read it ({exc.strerror or exc})") from exc
    if mode & 0o077:
        raise TokenFileError(
            f"security.tokens_file {path} is readable or writable by group or others (mode {mode:04o}); "
            f"run `chmod 600 {path}` (owner only) and start again"
        )


def interceptors(config: SecurityConfig, managed_collections: frozenset[str] = frozenset()) -> list[grpc.aio.ServerInterceptor]:
    """The auth interceptor when a tokens file is set; a warning and none otherwise. Errors are ConfigErrors.

    `managed_collections` are the server's own (the ROME catalogue): read-only but to admin tokens.
    """
    if config.tokens_file is None:
        log.warning("security.tokens_file is not set: every RPC is open to anyone who can reach the port")
        return []
    require_private(config.tokens_file)
    store = TokenStore.load(config.tokens_file)
    log.info("bearer tokens required: %d tokens from %s", len(store.tokens), config.tokens_file)
    if config.tls_cert is None:
        log.warning("bearer tokens travel in plaintext: set security.tls_cert and tls_key unless a TLS proxy fronts this port")
    return [AuthInterceptor(store, managed=managed_collections)]


def _read_pem(path: Path, key: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"security.{key} {path}: cannot read it ({exc.strerror or exc})") from exc
    if marker.encode() not in data:
        raise ConfigError(f"security.{key} {path}: no PEM '{marker}' block in it")
    return data


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files, requiring client certificates when tls_client_ca is set."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read_pem(config.tls_cert, "tls_cert", "-----BEGIN CERTIFICATE-----")
    key = _read_pem(config.tls_key, "tls_key", "PRIVATE KEY-----")
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read_pem(config.tls_client_ca, "tls_client_ca", "-----BEGIN CERTIFICATE-----")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen with TLS when there are credentials; returns the bound port (0: failure)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)

"""server/security.py without a server: the tokens file, the scope map, TLS file checks, `openemploi tokens`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import stat
from pathlib import Path

import pytest

from openemploi.cli import main
from openemploi.config import ConfigError, SecurityConfig, ServerConfig, load_config
from openemploi.security import (
    ADMIN,
    RPC_SCOPES,
    SCOPES,
    TokenFileError,
    TokenStore,
    append_token,
    interceptors,
    server_credentials,
)
from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2

DIGEST = hashlib.sha256(b"s3cret").hexdigest()


def entry(name: str = "svc-x", sha256: str = DIGEST, scopes: str = '["embed", "search"]') -> str:
    return f'[[tokens]]\nname = "{name}"\nsha256 = "{sha256}"\nscopes = {scopes}\n'


def test_every_rpc_of_every_service_has_a_scope_and_no_stale_entries():
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods - set(RPC_SCOPES) == set(), "RPCs without a scope are refused for everyone: add them to RPC_SCOPES"
    assert set(RPC_SCOPES) - methods == set(), "RPC_SCOPES names methods the protos no longer have"
    assert set(RPC_SCOPES.values()) <= set(SCOPES)


def test_a_valid_file_parses_and_lookup_finds_the_token_by_its_hash():
    store = TokenStore.parse(entry() + "\n" + entry("ops", hashlib.sha256(b"other").hexdigest(), '["admin"]'), "t.toml")
    found = store.lookup("s3cret")
    assert found is not None and found.name == "svc-x" and found.scopes == {"embed", "search"}
    assert found.allows("embed") and not found.allows("ingest") and not found.allows(ADMIN)
    admin = store.lookup("other")
    assert admin is not None and all(admin.allows(scope) for scope in SCOPES)
    assert store.lookup("s3cret ") is None and store.lookup("") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tokens]\nname = 1", "not valid TOML"),
        (entry(scopes='["embed", "teleport"]'), "unknown scope 'teleport'"),
        (entry(scopes="[]"), "no scopes"),
        (entry(scopes='"embed"'), "scopes must be a list"),
        (entry(sha256="zz" * 32), "sha256 must be 64 hex characters"),
        (entry(sha256=DIGEST[:-2]), "sha256 must be 64 hex characters"),
        (entry(name="bad name"), "name must be"),
        (entry() + entry(sha256=hashlib.sha256(b"x").hexdigest()), "name used twice"),
        (entry() + entry(name="svc-y"), "same sha256 as an earlier entry"),
        (entry() + 'owner = "me"\n', "unknown keys ['owner']"),
        ('token = "abc"\n', "unknown keys ['token']"),
    ],
)
def test_a_bad_file_is_a_clear_error_naming_the_entry(text, message):
    with pytest.raises(TokenFileError, match=re.escape(message)):
        TokenStore.parse(text, "t.toml")


def test_the_server_refuses_a_missing_or_empty_tokens_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TokenStore.load(tmp_path / "absent.toml")
    (tmp_path / "empty.toml").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="no \\[\\[tokens\\]\\] entries"):
        TokenStore.load(tmp_path / "empty.toml")


def test_append_token_writes_only_the_hash_to_a_0600_file(tmp_path):
    path = tmp_path / "sub" / "tokens.toml"
    token = append_token(path, "svc-x", ["search", "embed"])
    assert token.startswith("oe_")  # never "-...": the CLI's --token would read it as an option
    second = append_token(path, "ops", ["admin"])
    text = path.read_text(encoding="utf-8")
    assert token not in text and second not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = TokenStore.load(path)
    assert store.lookup(token).name == "svc-x" and store.lookup(second).name == "ops"
    with pytest.raises(TokenFileError, match="already has a token named 'ops'"):
        append_token(path, "ops", ["embed"])
    with pytest.raises(TokenFileError, match="unknown scope"):
        append_token(path, "new", ["embed", "root"])


def test_tokens_cli_prints_the_token_once_and_lists_names(tmp_path, capsys):
    path = tmp_path / "tokens.toml"
    assert main(["tokens", "new", "--name", "svc-x", "--scopes", "embed,search", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenStore.load(path).lookup(token).scopes == {"embed", "search"}
    assert main(["tokens", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out == "svc-x\tembed,search\n"
    assert main(["tokens", "new", "--name", "x", "--scopes", "god", "--file", str(path)]) == 2
    assert "unknown scope 'god'" in capsys.readouterr().err


def test_no_tokens_file_means_open_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="openemploi.security"):
        assert interceptors(SecurityConfig()) == []
    assert "every RPC is open" in caplog.text


def test_security_config_from_env_and_its_rules(tmp_path):
    env = {"OPENEMPLOI_SECURITY_TOKENS_FILE": "/etc/oe/tokens.toml"}
    config = load_config(None, env=env)
    assert config.security == SecurityConfig(tokens_file=Path("/etc/oe/tokens.toml"))
    with pytest.raises(ConfigError, match="tls_cert and security.tls_key go together"):
        load_config(None, env={"OPENEMPLOI_SECURITY_TLS_CERT": "c.pem"})
    with pytest.raises(ConfigError, match="tls_client_ca .* needs TLS"):
        load_config(None, env={"OPENEMPLOI_SECURITY_TLS_CLIENT_CA": "ca.pem"})


def test_unreadable_or_non_pem_tls_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"security.tls_cert .*absent.pem: cannot read"):
        server_credentials(SecurityConfig(tls_cert=tmp_path / "absent.pem", tls_key=tmp_path / "absent.key"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello", encoding="utf-8")
    with pytest.raises(ConfigError, match="no PEM '-----BEGIN CERTIFICATE-----' block"):
        server_credentials(SecurityConfig(tls_cert=garbage, tls_key=garbage))


def test_start_server_fails_before_listening_on_a_bad_tokens_file(tmp_path):
    from openemploi.app import start_server

    (tmp_path / "tokens.toml").write_text(entry(scopes='["sudo"]'), encoding="utf-8")
    (tmp_path / "tokens.toml").chmod(0o600)
    config = dataclasses.replace(ServerConfig(port=0), security=SecurityConfig(tokens_file=tmp_path / "tokens.toml"))
    with pytest.raises(ConfigError, match="unknown scope 'sudo'"):
        asyncio.run(start_server(config))


@pytest.mark.parametrize("key", ["TOKENS_FILE", "TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"])
def test_an_empty_security_path_is_a_config_error_naming_the_key(tmp_path, key):
    """An empty value is a mistake (a template left unfilled), never "unset": the server must not start open."""
    with pytest.raises(ConfigError, match=f"OPENEMPLOI_SECURITY_{key} is empty"):
        load_config(None, env={f"OPENEMPLOI_SECURITY_{key}": ""})
    path = tmp_path / "server.toml"
    path.write_text(f'[security]\n{key.lower()} = ""\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"security\.{key.lower()} is empty"):
        load_config(path, env={})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_tokens_file_open_to_group_or_others_is_refused_with_the_chmod_to_run(tmp_path, mode):
    path = tmp_path / "tokens.toml"
    append_token(path, "svc-x", ["embed"])
    path.chmod(mode)
    with pytest.raises(ConfigError, match=re.escape(f"chmod 600 {path}")) as info:
        interceptors(SecurityConfig(tokens_file=path))
    assert f"{mode:04o}" in str(info.value) and "group or others" in str(info.value)
    path.chmod(0o600)
    assert len(interceptors(SecurityConfig(tokens_file=path))) == 1

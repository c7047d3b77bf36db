"""server/config.py: defaults < TOML file < OPENEMPLOI_* environment < CLI overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from openemploi.config import ConfigError, ServerConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "server.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_documented_values():
    config = load_config(None, env={})
    assert isinstance(config, ServerConfig)
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert config.address == "127.0.0.1:50051"
    assert config.model_repository == Path("models")
    assert config.default_model == "multilingual-e5-small"
    assert config.models == ("multilingual-e5-small",)
    assert config.grace_period_s == 10.0
    b = config.batching
    assert (b.max_batch_size, b.max_batch_tokens, b.max_queue_texts, b.max_wait_ms, b.lookahead) == (
        64,
        16384,
        4096,
        1.0,
        256,
    )
    assert (config.backend.device, config.backend.cpu_precision, config.backend.intra_op_threads) == ("auto", "auto", 0)
    assert config.backend.math_threads == 1
    lim = config.limits
    assert (lim.max_texts_per_request, lim.max_message_bytes, lim.max_text_chars, lim.stream_window) == (
        1024,
        16 * 1024 * 1024,
        200_000,
        8,
    )
    assert (lim.max_k, lim.max_stream_requests, lim.max_upsert_documents) == (2048, 100_000, 4096)
    assert (lim.max_ids_per_request, lim.match_max_text_chars, lim.match_max_k) == (4096, 20_000, 100)


def test_readme_example_file_loads_and_matches_defaults(tmp_path):
    """The TOML block in README.md uses only known keys and documents the real defaults."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no ```toml block"
    from_readme = load_config(write(tmp_path, blocks[0]), env={})
    assert from_readme == load_config(None, env={})


def test_env_none_reads_process_environment(monkeypatch):
    monkeypatch.setenv("OPENEMPLOI_PORT", "50777")
    assert load_config(None).port == 50777


# --------------------------------------------------------------------------- file


def test_toml_file_values(tmp_path):
    path = write(
        tmp_path,
        """
host = "0.0.0.0"
port = 50990
model_repository = "/srv/models"
models = ["a", "b"]
grace_period_s = 3.5
log_json = false

[batching]
max_batch_size = 16
max_batch_tokens = 4096
max_wait_ms = 0.0

[backend]
device = "cpu"
cpu_precision = "fp32"
intra_op_threads = 2

[limits]
stream_window = 2
max_text_chars = 1000
""",
    )
    config = load_config(path, env={})
    assert config.address == "0.0.0.0:50990"
    assert config.model_repository == Path("/srv/models")
    assert config.models == ("a", "b")
    assert config.grace_period_s == 3.5
    assert config.log_json is False
    assert (config.batching.max_batch_size, config.batching.max_batch_tokens, config.batching.max_wait_ms) == (16, 4096, 0.0)
    # keys not in the file keep their defaults
    assert config.batching.lookahead == 256
    assert (config.backend.device, config.backend.cpu_precision, config.backend.intra_op_threads) == ("cpu", "fp32", 2)
    assert (config.limits.stream_window, config.limits.max_text_chars) == (2, 1000)
    assert config.limits.max_texts_per_request == 1024


def test_missing_file_raises_config_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing, env={})


def test_invalid_toml_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"server\.toml"):
        load_config(write(tmp_path, "port = \n"), env={})


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="prot"):
        load_config(write(tmp_path, "prot = 50990\n"), env={})


def test_unknown_section_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"batching.*max_batch\b"):
        load_config(write(tmp_path, "[batching]\nmax_batch = 3\n"), env={})


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="batcher"):
        load_config(write(tmp_path, "[batcher]\nmax_batch_size = 3\n"), env={})


def test_scalar_for_a_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="batching"):
        load_config(write(tmp_path, "batching = 3\n"), env={})


@pytest.mark.parametrize(
    "text, key",
    [
        ('port = "fifty"\n', "port"),
        ('log_json = "maybe"\n', "log_json"),
        ('grace_period_s = "soon"\n', "grace_period_s"),
        ('[batching]\nmax_batch_size = "lots"\n', "max_batch_size"),
        ("[limits]\nstream_window = [1, 2]\n", "stream_window"),
    ],
)
def test_bad_value_type_raises_config_error_naming_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize(
    "text, key",
    [
        ("[batching]\nmax_batch_size = 0\n", "max_batch_size"),
        ("[batching]\nmax_batch_tokens = -1\n", "max_batch_tokens"),
        ("[batching]\nmax_queue_texts = 0\n", "max_queue_texts"),
        ("[batching]\nmax_wait_ms = -1.0\n", "max_wait_ms"),
        ("[batching]\nmax_batch_size = 300\n", "lookahead"),  # lookahead (256) < max_batch_size
    ],
)
def test_invalid_batching_values_raise_config_error(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text), env={})


# --------------------------------------------------------------------------- environment


def test_env_overrides():
    config = load_config(
        None,
        env={
            "OPENEMPLOI_PORT": "50990",
            "OPENEMPLOI_BATCHING_MAX_BATCH_SIZE": "32",
            "OPENEMPLOI_BACKEND_DEVICE": "cpu",
            "OPENEMPLOI_MODELS": "a,b",
            "OPENEMPLOI_LOG_JSON": "false",
            "OPENEMPLOI_BATCHING_MAX_WAIT_MS": "2.5",
            "OPENEMPLOI_BACKEND_INTRA_OP_THREADS": "4",
            "OPENEMPLOI_LIMITS_STREAM_WINDOW": "3",
            "OPENEMPLOI_MODEL_REPOSITORY": "/srv/models",
        },
    )
    assert config.port == 50990
    assert config.batching.max_batch_size == 32
    assert config.batching.max_wait_ms == 2.5
    assert config.backend.device == "cpu"
    assert config.backend.intra_op_threads == 4
    assert config.models == ("a", "b")
    assert config.log_json is False
    assert config.limits.stream_window == 3
    assert config.model_repository == Path("/srv/models")


def test_env_models_list_is_trimmed_and_skips_empty_items():
    assert load_config(None, env={"OPENEMPLOI_MODELS": " a , b ,"}).models == ("a", "b")


def test_env_ignores_variables_without_the_prefix():
    assert load_config(None, env={"PORT": "1", "BATCHING_MAX_BATCH_SIZE": "2"}).port == 50051


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="OPENEMPLOI_BATCHING_MAX_BATCH_SIZE"):
        load_config(None, env={"OPENEMPLOI_BATCHING_MAX_BATCH_SIZE": "abc"})


def test_invalid_env_batching_value_raises():
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_config(None, env={"OPENEMPLOI_BATCHING_MAX_BATCH_SIZE": "0"})


# --------------------------------------------------------------------------- precedence


def test_precedence_cli_beats_env_beats_file(tmp_path):
    path = write(tmp_path, "port = 1000\n[batching]\nmax_batch_size = 8\n")
    env = {"OPENEMPLOI_PORT": "2000", "OPENEMPLOI_BATCHING_MAX_BATCH_SIZE": "16"}

    assert load_config(path, env={}).port == 1000
    assert load_config(path, env={}).batching.max_batch_size == 8

    from_env = load_config(path, env=env)
    assert (from_env.port, from_env.batching.max_batch_size) == (2000, 16)

    from_cli = load_config(path, env=env, overrides={"port": 3000, "batching.max_batch_size": 32})
    assert (from_cli.port, from_cli.batching.max_batch_size) == (3000, 32)


def test_cli_override_only_masks_its_own_env_key(tmp_path):
    env = {"OPENEMPLOI_PORT": "2000", "OPENEMPLOI_HOST": "10.0.0.1"}
    config = load_config(None, env=env, overrides={"host": "0.0.0.0"})
    assert config.host == "0.0.0.0"
    assert config.port == 2000


def test_none_override_means_flag_not_given(tmp_path):
    path = write(tmp_path, "port = 1000\n")
    config = load_config(path, env={"OPENEMPLOI_PORT": "2000"}, overrides={"port": None, "host": None})
    assert config.port == 2000
    assert config.host == "127.0.0.1"


def test_cli_models_list_override(tmp_path):
    path = write(tmp_path, 'models = ["x"]\n')
    config = load_config(path, env={"OPENEMPLOI_MODELS": "y"}, overrides={"models": ["a", "b"]})
    assert config.models == ("a", "b")


def test_cli_override_into_section_missing_from_file(tmp_path):
    path = write(tmp_path, "port = 1000\n")
    config = load_config(path, env={}, overrides={"backend.device": "cpu", "limits.stream_window": 4})
    assert config.backend.device == "cpu"
    assert config.limits.stream_window == 4
    assert config.port == 1000


def test_invalid_cli_override_raises_config_error():
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_config(None, env={}, overrides={"batching.max_batch_size": 0})


def test_unknown_cli_override_key_is_named():
    with pytest.raises(ConfigError, match="colour"):
        load_config(None, env={}, overrides={"colour": "blue"})


# --------------------------------------------------------------------------- type and range checks


@pytest.mark.parametrize("text", ["port = 1.5\n", "[batching]\nmax_batch_size = 2.5\n"])
def test_float_for_integer_field_is_rejected(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize("text", ["port = true\n", "[batching]\nmax_batch_size = true\n"])
def test_boolean_for_integer_field_is_rejected(tmp_path, text):
    """int(True) == 1: a boolean must not slip through as a port or a batch size."""
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("OPENEMPLOI_BACKEND_DEVICE", "gpu", "device"),
        ("OPENEMPLOI_BACKEND_CPU_PRECISION", "fp8", "cpu_precision"),
        ("OPENEMPLOI_BACKEND_INTRA_OP_THREADS", "-1", "thread"),
        ("OPENEMPLOI_BACKEND_MATH_THREADS", "-2", "thread"),
    ],
)
def test_invalid_backend_values_are_rejected(key, value, match):
    """A typo such as device = "gpu" must fail at start, not silently serve on the CPU."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, env={key: value})


@pytest.mark.parametrize(
    "field",
    [
        "stream_window",
        "max_texts_per_request",
        "max_text_chars",
        "max_message_bytes",
        "max_k",
        "max_stream_requests",
        "max_upsert_documents",
        "max_ids_per_request",
        "match_max_text_chars",
        "match_max_k",
        "max_request_chars",
        "tokenize_threads",
    ],
)
def test_zero_limits_are_rejected(tmp_path, field):
    """stream_window = 0 would make EmbedStream pop an empty window."""
    with pytest.raises(ConfigError, match=field):
        load_config(write(tmp_path, f"[limits]\n{field} = 0\n"), env={})


def test_new_request_limits_are_set_like_the_others(tmp_path):
    path = write(tmp_path, "[limits]\nmax_ids_per_request = 10\nmatch_max_text_chars = 500\nmatch_max_k = 20\n")
    limits = load_config(path, env={"OPENEMPLOI_LIMITS_MATCH_MAX_K": "30"}).limits
    assert (limits.max_ids_per_request, limits.match_max_text_chars, limits.match_max_k) == (10, 500, 30)


def test_tokenising_limits_have_defaults_and_are_set_like_the_others(tmp_path):
    defaults = load_config(None, env={}).limits
    assert (defaults.max_request_chars, defaults.tokenize_threads) == (4_000_000, 2)
    path = write(tmp_path, "[limits]\nmax_request_chars = 50000\ntokenize_threads = 3\n")
    limits = load_config(path, env={"OPENEMPLOI_LIMITS_TOKENIZE_THREADS": "4"}).limits
    assert (limits.max_request_chars, limits.tokenize_threads) == (50_000, 4)


def test_max_k_cannot_exceed_what_the_index_searches():
    from openemploi.index.vectors import MAX_K

    assert load_config(None, env={}).limits.max_k == MAX_K
    with pytest.raises(ConfigError, match=r"limits\.max_k must be at most"):
        load_config(None, env={"OPENEMPLOI_LIMITS_MAX_K": str(MAX_K + 1)})


def test_directory_as_config_file_raises_config_error(tmp_path):
    """The CLI only catches ConfigError: an unreadable path must not end in a traceback."""
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path, env={})

"""The YAML configuration: what loads, and how a wrong file is reported."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from aiguillage.catalog.config import (
    DEFAULT_DATABASE_URL,
    ConfigError,
    GatewayConfig,
    load_config,
    parse_config,
)

VALID = """
database_url: sqlite+aiosqlite:///./test.db
models:
  - name: llama-3-70b
    model: meta-llama/Llama-3-70B-Instruct
    aliases: [llama, llama3]
    routing_strategy: round-robin
    servers:
      - url: http://gpu1.example:8000/v1
        token: ${TEST_ENGINE_TOKEN}
        engine: vllm
        max_concurrency: 32
        site: paris
        owner: team-a
      - url: https://gpu2.example
  - name: mistral
    servers:
      - url: http://gpu3.example:8000
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def server_yaml(**fields: str) -> str:
    extra = "".join(f"\n        {key}: {value}" for key, value in fields.items())
    return f"""
models:
  - name: m
    servers:
      - url: http://gpu1.example:8000{extra}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIGUILLAGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("AIGUILLAGE_SECRETS_KEY", raising=False)
    monkeypatch.setenv("TEST_ENGINE_TOKEN", "tok-s3cret-value")


def test_valid_file_loads_every_documented_field(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    first, second = config.models
    assert (first.name, first.model, first.aliases) == (
        "llama-3-70b",
        "meta-llama/Llama-3-70B-Instruct",
        ["llama", "llama3"],
    )
    assert first.routing_strategy == "round-robin"
    server = first.servers[0]
    assert server.base_url == "http://gpu1.example:8000/v1"
    assert (server.engine, server.max_concurrency, server.site, server.owner) == (
        "vllm",
        32,
        "paris",
        "team-a",
    )
    assert second.name == "mistral"
    assert second.served_name == "mistral"


def test_defaults_apply_to_omitted_server_fields(tmp_path: Path) -> None:
    server = load_config(write(tmp_path, VALID)).models[0].servers[1]
    assert server.base_url == "https://gpu2.example"
    assert (server.token, server.engine, server.max_concurrency) == (None, "openai", 16)


def test_token_is_interpolated_from_the_environment(tmp_path: Path) -> None:
    token = load_config(write(tmp_path, VALID)).models[0].servers[0].token
    assert isinstance(token, SecretStr)
    assert token.get_secret_value() == "tok-s3cret-value"


def test_default_is_used_when_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_UNSET_VAR", raising=False)
    config = parse_config({"site": "${TEST_UNSET_VAR:-lyon}"})
    assert config.site == "lyon"


def test_environment_wins_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SITE_VAR", "nantes")
    assert parse_config({"site": "${TEST_SITE_VAR:-lyon}"}).site == "nantes"


def test_interpolation_inside_a_longer_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOST_VAR", "gpu9")
    config = parse_config(
        {"models": [{"name": "m", "servers": [{"url": "http://${TEST_HOST_VAR}:8000/v1"}]}]}
    )
    assert config.models[0].servers[0].base_url == "http://gpu9:8000/v1"


def test_missing_env_var_names_file_field_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_ENGINE_TOKEN")
    path = write(tmp_path, VALID)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "models[0].servers[0].token" in message
    assert "TEST_ENGINE_TOKEN" in message


def test_wrong_type_names_file_and_field_path(tmp_path: Path) -> None:
    path = write(tmp_path, server_yaml(max_concurrency="lots"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "models[0].servers[0].max_concurrency" in message
    assert "'lots'" in message


def test_out_of_range_concurrency_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.servers\[0\]\.max_concurrency"):
        load_config(write(tmp_path, server_yaml(max_concurrency="0")))


def test_unknown_engine_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.servers\[0\]\.engine"):
        load_config(write(tmp_path, server_yaml(engine="triton")))


def test_unknown_server_field_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.servers\[0\]\.tokne"):
        load_config(write(tmp_path, server_yaml(tokne="x")))


def test_unknown_top_level_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match="databse_url"):
        parse_config({"databse_url": "sqlite+aiosqlite:///x.db"})


def test_model_without_servers_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.servers"):
        parse_config({"models": [{"name": "m", "servers": []}]})


def test_duplicate_model_name_is_rejected() -> None:
    server = [{"url": "http://gpu1.example"}]
    data = {"models": [{"name": "m", "servers": server}, {"name": "m", "servers": server}]}
    with pytest.raises(ConfigError, match="'m' is used twice"):
        parse_config(data)


def test_alias_clashing_with_another_model_name_is_rejected() -> None:
    server = [{"url": "http://gpu1.example"}]
    data = {
        "models": [
            {"name": "a", "servers": server},
            {"name": "b", "aliases": ["a"], "servers": server},
        ]
    }
    with pytest.raises(ConfigError, match="'a' is used twice"):
        parse_config(data)


def test_alias_repeated_within_one_model_is_rejected() -> None:
    data = {"models": [{"name": "a", "aliases": ["x", "x"], "servers": [{"url": "http://h"}]}]}
    with pytest.raises(ConfigError, match="'x' is used twice"):
        parse_config(data)


@pytest.mark.parametrize(
    "url", ["postgresql://u@h/db", "mysql+aiomysql://u@h/db", "sqlite:///x.db"]
)
def test_database_url_with_unsupported_driver_is_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="database_url"):
        parse_config({"database_url": url})


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///x.db", "postgresql+asyncpg://u@h/db"])
def test_database_url_with_supported_driver_is_kept(url: str) -> None:
    assert parse_config({"database_url": url}).resolved_database_url() == url


def test_environment_database_url_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGUILLAGE_DATABASE_URL", "postgresql+asyncpg://u@db/prod")
    config = parse_config({"database_url": "sqlite+aiosqlite:///file.db"})
    assert config.resolved_database_url() == "postgresql+asyncpg://u@db/prod"


def test_database_url_defaults_when_unset() -> None:
    assert parse_config({}).resolved_database_url() == DEFAULT_DATABASE_URL


def test_token_never_appears_in_repr_or_str(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    for text in (repr(config), str(config), repr(config.models[0].servers[0])):
        assert "tok-s3cret-value" not in text
    assert "tok-s3cret-value" not in config.model_dump_json()


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_non_mapping_top_level_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_empty_file_gives_default_config(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == GatewayConfig()


def test_the_jobs_section_has_defaults_and_is_strict() -> None:
    from aiguillage.catalog.config import ConfigError, parse_config

    config = parse_config({"jobs": {"lease_s": 20, "transcriber": {"model": "tiny.en"}}})
    assert config.jobs.lease_s == 20 and config.jobs.allow_private_urls is False
    assert config.jobs.transcriber.engine == "local"
    for wrong in (
        {"jobs": {"lease": 20}},
        {"jobs": {"transcriber": {"engine": "openai"}}},  # a remote engine needs its url
        {"jobs": {"max_upload_bytes": 10}},
    ):
        with pytest.raises(ConfigError):
            parse_config(wrong)


def test_scheduler_url_selects_redis_and_defaults_to_in_process() -> None:
    assert parse_config({}).scheduler_url is None
    assert parse_config({"scheduler_url": "redis://r:6379/0"}).scheduler_url == "redis://r:6379/0"
    with pytest.raises(ConfigError, match="scheduler_url"):
        parse_config({"scheduler_url": "http://r:6379"})


def test_the_secrets_key_comes_from_the_environment_first_and_must_be_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_config({}).resolved_secrets_key() is None
    from_file = parse_config({"secrets_key": "sixteen chars ok"})
    assert from_file.resolved_secrets_key() == "sixteen chars ok"
    monkeypatch.setenv("AIGUILLAGE_SECRETS_KEY", "from the environment")
    assert from_file.resolved_secrets_key() == "from the environment"
    monkeypatch.setenv("AIGUILLAGE_SECRETS_KEY", "short")
    with pytest.raises(ConfigError, match="16 characters"):
        from_file.resolved_secrets_key()
    with pytest.raises(ConfigError, match="secrets_key"):
        parse_config({"secrets_key": "short"})

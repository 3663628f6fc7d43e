"""`aiguillage keys` from the shell's side: output, exit codes, and what lands in the database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aiguillage.auth.keys import hash_key
from aiguillage.catalog.config import DATABASE_URL_ENV
from aiguillage.cli.keys import keys_app, resolve_database_url
from tests.store import pg

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_ambient_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the caller's environment nor the current folder may leak into a test."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys.db"


@pytest.fixture
def url(db_file: Path) -> str:
    return f"sqlite+aiosqlite:///{db_file}"


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    dsn = pg.create_database()
    yield dsn
    pg.drop_database(dsn)


def keys(*args: str) -> Result:
    return runner.invoke(keys_app, list(args))


def sqlite_rows(db_file: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db_file) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM api_keys ORDER BY id")]


def assert_clean_failure(result: Result, exit_code: int, message: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash


def test_create_json_prints_one_object_and_stores_only_the_hash(url: str, db_file: Path) -> None:
    in_400_days = (datetime.now(UTC) + timedelta(days=400)).date().isoformat()
    result = keys(
        "create", "--name", "chatbot", "--org", "dinum", "--priority", "5",
        "--threshold", "20", "--models", "llama, mistral,,llama", "--admin",
        "--expires", in_400_days, "--json", "--database-url", url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    secret = created["key"]
    assert secret.startswith("sk-ag-") and len(secret) == 49
    assert created["prefix"] == secret[:12]
    assert created["name"] == "chatbot" and created["organisation"] == "dinum"
    assert (created["priority"], created["queue_threshold"]) == (5, 20)
    assert created["allowed_models"] == ["llama", "mistral"]
    assert created["is_admin"] is True
    assert created["expires_at"] == f"{in_400_days}T00:00:00+00:00"  # a date: 00:00 UTC

    [row] = sqlite_rows(db_file)  # the folder was created and the schema migrated
    assert row["id"] == created["id"]
    assert row["key_hash"] == hash_key(secret)
    assert secret not in json.dumps(row)


def test_create_without_json_shows_the_key_once_with_a_warning(url: str) -> None:
    result = keys("create", "--name", "bot [bold]x[/]", "--org", "dinum", "--database-url", url)
    assert result.exit_code == 0, result.output
    secret_lines = [line for line in result.stdout.splitlines() if line.startswith("sk-ag-")]
    assert len(secret_lines) == 1 and len(secret_lines[0]) == 49  # whole, on a line of its own
    assert "shown only once" in result.stdout
    assert "bot [bold]x[/]" in result.stdout  # names are text, not Rich markup


def test_list_shows_prefixes_but_never_secrets_or_hashes(url: str) -> None:
    created = [
        json.loads(keys("create", "--name", f"k{i}", "--org", "o", "--json",
                        "--database-url", url).stdout)
        for i in range(2)
    ]  # fmt: skip
    for args in (("list",), ("list", "--json")):
        result = keys(*args, "--database-url", url)
        assert result.exit_code == 0, result.output
        for key in created:
            assert key["key"] not in result.stdout
            assert key["key"][12:20] not in result.stdout
            assert hash_key(key["key"]) not in result.stdout
        if "--json" not in args:
            assert all(key["prefix"] in result.stdout for key in created)  # whole, even at 80 cols
    listed = json.loads(keys("list", "--json", "--database-url", url).stdout)
    assert [entry["prefix"] for entry in listed] == [key["prefix"] for key in created]
    assert all("key" not in entry and "key_hash" not in entry for entry in listed)


def test_list_of_an_empty_database_says_so(url: str) -> None:
    result = keys("list", "--database-url", url)
    assert result.exit_code == 0 and "No API keys yet" in result.stdout
    assert json.loads(keys("list", "--json", "--database-url", url).stdout) == []


def test_routing_mode_is_stored_and_checked(url: str) -> None:
    result = keys("create", "--name", "a", "--org", "o", "--routing-mode", "private-only",
                  "--json", "--database-url", url)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["routing_mode"] == "private-only"
    [entry] = json.loads(keys("list", "--json", "--database-url", url).stdout)
    assert entry["routing_mode"] == "private-only"
    bad = keys("create", "--name", "a", "--org", "o", "--routing-mode", "nearest",
               "--database-url", url)  # fmt: skip
    assert_clean_failure(bad, 2, "routing_mode")


def test_revoke_then_list_shows_it_revoked(url: str) -> None:
    created = json.loads(keys("create", "--name", "a", "--org", "o", "--json",
                              "--database-url", url).stdout)  # fmt: skip
    result = keys("revoke", str(created["id"]), "--database-url", url)
    assert result.exit_code == 0, result.output
    assert f"Revoked key {created['id']}" in result.stdout
    assert "already revoked" in keys("revoke", str(created["id"]), "--database-url", url).stdout
    [entry] = json.loads(keys("list", "--json", "--database-url", url).stdout)
    assert entry["revoked"] is True
    assert json.loads(keys("list", "--active", "--json", "--database-url", url).stdout) == []


def test_revoke_of_an_unknown_id_exits_1(url: str) -> None:
    assert_clean_failure(keys("revoke", "999", "--database-url", url), 1, "no API key with id 999")


@pytest.mark.parametrize("expires", ["31/01/2027", "2027-13-01", "tomorrow", "2027-01-31T25:00"])
def test_a_bad_expiry_is_a_clear_error_and_touches_nothing(
    url: str, db_file: Path, expires: str
) -> None:
    result = keys("create", "--name", "a", "--org", "o", "--expires", expires,
                  "--database-url", url)  # fmt: skip
    assert_clean_failure(result, 2, "invalid --expires")
    assert not db_file.exists()  # refused before the database was opened


def test_an_expiry_in_the_past_is_refused(url: str) -> None:
    result = keys("create", "--name", "a", "--org", "o", "--expires", "2020-01-01",
                  "--database-url", url)  # fmt: skip
    assert_clean_failure(result, 2, "in the past")


def test_a_full_iso_expiry_is_kept_as_the_same_instant_in_utc(url: str) -> None:
    year = datetime.now(UTC).year + 2
    result = keys("create", "--name", "a", "--org", "o", "--json", "--database-url", url,
                  "--expires", f"{year}-03-01T18:30:00+01:00")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["expires_at"] == f"{year}-03-01T17:30:00+00:00"


def test_invalid_settings_exit_2_with_the_field_named(url: str) -> None:
    assert_clean_failure(
        keys("create", "--name", " ", "--org", "o", "--database-url", url), 2, "name"
    )
    assert_clean_failure(
        keys("create", "--name", "a", "--org", "o", "--models", ",", "--database-url", url),
        2,
        "--models",
    )


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    result = keys("list", "--database-url", "postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/x")
    assert_clean_failure(result, 1, "postgresql+asyncpg://postgres:***@127.0.0.1:1/x")
    assert "hunter2" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unsupported_url_is_refused(tmp_path: Path) -> None:
    result = keys("list", "--database-url", "mysql://root@localhost/db")
    assert_clean_failure(result, 2, "unsupported database URL")


def test_a_broken_config_file_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("database_url: 42\nnot_a_field: true\n")
    assert_clean_failure(keys("list", "--config", str(config)), 2, str(config))
    assert_clean_failure(keys("list", "--config", str(tmp_path / "nope.yaml")), 2, "nope.yaml")


def test_database_url_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--database-url, then the environment, then the config file, then the default."""
    config = tmp_path / "gateway.yaml"
    config.write_text(f"database_url: sqlite+aiosqlite:///{tmp_path / 'file.db'}\n")
    env_url = f"sqlite+aiosqlite:///{tmp_path / 'env.db'}"
    flag_url = f"sqlite+aiosqlite:///{tmp_path / 'flag.db'}"

    assert resolve_database_url(None, None) == "sqlite+aiosqlite:///./aiguillage.db"
    assert resolve_database_url(None, config).endswith("file.db")
    monkeypatch.setenv(DATABASE_URL_ENV, env_url)
    assert resolve_database_url(None, config) == env_url
    assert resolve_database_url(None, None) == env_url
    assert resolve_database_url(flag_url, config) == flag_url

    assert keys("list", "--config", str(config)).exit_code == 0
    assert (tmp_path / "env.db").exists() and not (tmp_path / "file.db").exists()
    monkeypatch.delenv(DATABASE_URL_ENV)
    assert keys("list").exit_code == 0  # the default, in the current folder
    assert (tmp_path / "aiguillage.db").exists()


def test_create_list_revoke_on_postgresql(postgres_dsn: str) -> None:
    url = pg.sqlalchemy_url(postgres_dsn)
    created = json.loads(
        keys("create", "--name", "a", "--org", "o", "--json", "--database-url", url).stdout
    )
    rows = pg.run_in_thread(pg.fetch(postgres_dsn, "SELECT key_hash, revoked FROM api_keys"))
    assert rows == [{"key_hash": hash_key(created["key"]), "revoked": False}]
    assert keys("revoke", str(created["id"]), "--database-url", url).exit_code == 0
    listed = json.loads(keys("list", "--json", "--database-url", url).stdout)
    assert [(entry["id"], entry["revoked"]) for entry in listed] == [(created["id"], True)]

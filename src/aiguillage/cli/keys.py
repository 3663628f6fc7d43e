"""`aiguillage keys`: create, list and revoke API keys from a shell.

Every command migrates the database first, so that a fresh machine works at
once. Mistakes (a bad date, a broken config file, an unreachable database) end
with one `error:` line on stderr, exit code 2 for bad input and 1 otherwise,
never with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from alembic.util import CommandError
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.catalog.config import (
    DATABASE_URL_ENV,
    DEFAULT_DATABASE_URL,
    ConfigError,
    load_config,
)
from aiguillage.store.database import Database
from aiguillage.store.keys import MAX_PRIORITY, KeyRepository
from aiguillage.store.tables import as_utc

T = TypeVar("T")

keys_app = typer.Typer(
    help="Create, list and revoke API keys.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", dir_okay=False, help="Gateway YAML file, for its database_url."),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help=f"Database URL; wins over ${DATABASE_URL_ENV}, then --config, "
        f"then {DEFAULT_DATABASE_URL}.",
        show_default=False,
    ),
]
# Name, organisation and models may wrap; what identifies a key (id, prefix) and its
# status never do, however narrow the terminal.
LIST_COLUMNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ID", {"no_wrap": True, "justify": "right"}),
    ("Name", {"overflow": "fold"}),
    ("Org", {"overflow": "fold"}),
    ("Prefix", {"no_wrap": True}),
    ("Prio", {"justify": "right"}),
    ("Queue", {"justify": "right"}),
    ("Models", {"overflow": "fold"}),
    ("Admin", {}),
    ("Expires", {"no_wrap": True}),
    ("Status", {"no_wrap": True}),
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class CliError(Exception):
    """A failure to report as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@keys_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses the key.")],
    org: Annotated[str, typer.Option("--org", help="Organisation billed for its usage.")],
    priority: Annotated[
        int, typer.Option(min=0, max=MAX_PRIORITY, help="Higher is served first.")
    ] = 0,
    threshold: Annotated[
        int, typer.Option(min=0, help="Queue length from which this key's requests wait.")
    ] = 100,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated public model names; every model if left out."),
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call the admin API.")] = False,
    routing_mode: Annotated[
        str,
        typer.Option(
            "--routing-mode",
            help="any | private-first | private-only: use of the organisation's own servers.",
        ),
    ] = "any",
    expires: Annotated[
        str | None,
        typer.Option(
            help="Expiry: a date (2027-01-31, meaning 00:00 UTC that day) or an ISO 8601 time."
        ),
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a key and print its secret, which is shown this once only."""
    try:  # bad input is refused before the database is even opened
        allowed = parse_models(models) if models is not None else None
        expires_at = parse_expiry(expires) if expires is not None else None
    except CliError as error:
        fail(str(error), error.exit_code)

    async def work(repository: KeyRepository) -> tuple[str, ApiKeyRecord]:
        try:
            return await repository.create(
                name=name,
                organisation=org,
                priority=priority,
                queue_threshold=threshold,
                allowed_models=allowed,
                is_admin=admin,
                expires_at=expires_at,
                routing_mode=routing_mode,
            )
        except ValueError as error:
            raise CliError(str(error), exit_code=2) from None

    secret, record = run(work, config, database_url)
    if as_json:
        typer.echo(json.dumps({"key": secret, **key_json(record)}))
        return
    console = Console()
    console.print(Panel(key_details(record), title="API key created", expand=False))
    console.print(secret, markup=False, highlight=False, soft_wrap=True)
    console.print(
        "[bold yellow]Store this key now: it is shown only once and cannot be recovered.[/]"
    )


@keys_app.command("list")
def list_keys(
    active: Annotated[bool, typer.Option("--active", help="Leave out revoked keys.")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """List keys by prefix; secrets and hashes are never shown."""

    async def work(repository: KeyRepository) -> list[ApiKeyRecord]:
        return await repository.list(include_revoked=not active)

    records = run(work, config, database_url)
    if as_json:
        typer.echo(json.dumps([key_json(record) for record in records]))
        return
    console = Console()
    if not records:
        console.print("No API keys yet: create one with 'aiguillage keys create'.")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for header, settings in LIST_COLUMNS:
        table.add_column(header, **settings)
    for record in records:
        cells = (
            str(record.id), record.name, record.organisation, record.prefix,
            str(record.priority), str(record.queue_threshold), models_text(record),
            "yes" if record.is_admin else "no", short_when(record.expires_at), status(record),
        )  # fmt: skip
        table.add_row(*(Text(cell) for cell in cells))  # Text: a name's [brackets] stay text
    console.print(table)


@keys_app.command()
def revoke(
    key_id: Annotated[int, typer.Argument(metavar="ID", help="The key's id, from 'keys list'.")],
    config: ConfigOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke a key: on PostgreSQL every gateway refuses it within a second (change notice);
    on SQLite, once its key cache expires (key_cache_ttl_s)."""

    async def work(repository: KeyRepository) -> tuple[ApiKeyRecord, bool]:
        record = await repository.get(key_id)
        if record is None:
            raise CliError(f"no API key with id {key_id}")
        if not record.revoked:
            await repository.revoke(key_id)
        return record, record.revoked

    record, already = run(work, config, database_url)
    what = f"key {record.id} ({record.name}, prefix {record.prefix})"
    typer.echo(f"{what} was already revoked." if already else f"Revoked {what}.")


def resolve_database_url(database_url: str | None, config: Path | None) -> str:
    """--database-url, then $AIGUILLAGE_DATABASE_URL, then the config file's, then the default.

    A --config file is read even when its URL is not used: a broken file must be told.
    """
    from_config = load_config(config).resolved_database_url() if config is not None else None
    if database_url:
        return database_url
    return from_config or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def parse_expiry(text: str) -> datetime:
    """A future UTC instant from a date (00:00 UTC that day) or an ISO 8601 time (naive: UTC)."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise CliError(
            f"invalid --expires {text!r}: expected a date like 2027-01-31 "
            "or an ISO 8601 time like 2027-01-31T18:00:00+01:00",
            exit_code=2,
        ) from None
    if moment <= datetime.now(UTC):
        raise CliError(f"--expires {text!r} is in the past", exit_code=2)
    return moment


def parse_models(text: str) -> list[str]:
    """Model names from `m1,m2`; an empty list is refused, as it would allow no model."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CliError("--models is empty: leave it out to allow every model", exit_code=2)
    return names


def run(
    work: Callable[[KeyRepository], Awaitable[T]], config: Path | None, database_url: str | None
) -> T:
    """Migrate the database, then run `work` on its keys; failures exit with one clear line."""

    async def on_keys(database: Database) -> T:
        return await work(KeyRepository(database))

    return run_on_database(on_keys, config, database_url)


def run_on_database(
    work: Callable[[Database], Awaitable[T]], config: Path | None, database_url: str | None
) -> T:
    """Migrate the database, then run `work` on it; failures exit with one clear line."""
    try:
        url = resolve_database_url(database_url, config)
        database = Database(url)
    except (ConfigError, ValueError) as error:
        fail(str(error), 2)

    async def session() -> T:
        try:
            await database.upgrade()
            return await work(database)
        finally:
            await database.dispose()

    try:
        return asyncio.run(session())
    except CliError as error:
        fail(str(error), error.exit_code)
    except (SQLAlchemyError, OSError, CommandError) as error:
        fail(f"database {database.display_url}: {describe(error)}", 1)


def fail(message: str, exit_code: int) -> NoReturn:
    """Print `error: message` on stderr and exit; plain text, so no markup is interpreted."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code)


def describe(error: BaseException) -> str:
    """The driver's own words when there are some, without SQLAlchemy's SQL and links."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0]


def key_json(record: ApiKeyRecord) -> dict[str, Any]:
    """A key as JSON: everything but its secret, which only `create` ever prints."""
    return {
        "id": record.id,
        "name": record.name,
        "organisation": record.organisation,
        "prefix": record.prefix,
        "priority": record.priority,
        "queue_threshold": record.queue_threshold,
        "allowed_models": None if record.allowed_models is None else list(record.allowed_models),
        "is_admin": record.is_admin,
        "routing_mode": record.routing_mode,
        "expires_at": iso(record.expires_at),
        "revoked": record.revoked,
        "created_at": iso(record.created_at),
    }


def key_details(record: ApiKeyRecord) -> Table:
    grid = Table.grid(padding=(0, 2))
    for label, value in (
        ("ID", str(record.id)),
        ("Name", record.name),
        ("Organisation", record.organisation),
        ("Prefix", record.prefix),
        ("Priority", str(record.priority)),
        ("Queue threshold", str(record.queue_threshold)),
        ("Models", models_text(record)),
        ("Admin", "yes" if record.is_admin else "no"),
        ("Expires", when(record.expires_at)),
    ):
        grid.add_row(label, Text(value))
    return grid


def models_text(record: ApiKeyRecord) -> str:
    return "all" if record.allowed_models is None else ", ".join(record.allowed_models)


def status(record: ApiKeyRecord) -> str:
    if record.revoked:
        return "revoked"
    return "expired" if record.is_expired() else "active"


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def when(moment: datetime | None) -> str:
    return "never" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def short_when(moment: datetime | None) -> str:
    """`when()` for a table cell: the date alone when the time is midnight UTC."""
    if moment is not None and moment.time() == time(0):
        return moment.strftime("%Y-%m-%d")
    return when(moment)

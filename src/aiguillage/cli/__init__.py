"""The `aiguillage` command line: serve, keys, models, check-config."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from aiguillage.api.factory import CONFIG_ENV
from aiguillage.catalog.config import ConfigError, GatewayConfig, load_config
from aiguillage.cli.keys import keys_app
from aiguillage.observability.metrics import MULTIPROC_ENV

app = typer.Typer(
    help="Aiguillage: one OpenAI-compatible API in front of pooled GPU servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Inspect the model catalog.", no_args_is_help=True)
app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys.")
app.add_typer(models_app, name="models")

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")]


def _load(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False, markup=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOption,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request line.")] = False,
) -> None:
    """Start the gateway."""
    gateway_config = _load(config)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _migrate(gateway_config)  # once, before workers start and race each other
    os.environ[CONFIG_ENV] = str(config.resolve())
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="aiguillage-metrics-")
    uvicorn.run(
        "aiguillage.api.factory:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # client addresses are not used; saves a middleware per request
        access_log=access_log,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="YAML configuration file.")]) -> None:
    """Validate a configuration file and summarise it."""
    gateway_config = _load(path)
    servers = sum(len(model.servers) for model in gateway_config.models)
    console.print(
        f"[green]OK[/green] {path}: {len(gateway_config.models)} models, {servers} servers, "
        f"database {_redacted(gateway_config.resolved_database_url())}"
    )


@models_app.command("list")
def list_models(config: ConfigOption) -> None:
    """List the models of a configuration, with their servers (tokens never shown)."""
    gateway_config = _load(config)
    table = Table("model", "served as", "aliases", "routing", "servers")
    for model in gateway_config.models:
        servers = "\n".join(
            f"{server.base_url} [{server.engine}, max {server.max_concurrency}"
            + (f", site {server.site}" if server.site else "")
            + (f", owner {server.owner}" if server.owner else "")
            + "]"
            for server in model.servers
        )
        table.add_row(
            model.name, model.served_name, ", ".join(model.aliases), model.routing_strategy, servers
        )
    console.print(table)


@app.command("whisper-server")
def whisper_server(
    model: Annotated[str, typer.Option(help="Whisper model: base or tiny.en.")] = "base",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9100,
    cpu_threads: Annotated[int, typer.Option(min=0, help="CPU threads (0: all).")] = 0,
) -> None:
    """Serve a local Whisper model as an OpenAI-compatible transcription backend."""
    from aiguillage.speech.errors import TranscriptionError
    from aiguillage.speech.server import serve_whisper

    try:
        serve_whisper(model, host, port, cpu_threads=cpu_threads)
    except TranscriptionError as error:
        errors.print(f"error: {error}", highlight=False, markup=False)
        raise typer.Exit(1) from None


def _migrate(config: GatewayConfig) -> None:
    from aiguillage.store.database import Database

    async def upgrade() -> None:
        database = Database(config.resolved_database_url())
        try:
            await database.upgrade()
        finally:
            await database.dispose()

    try:
        asyncio.run(upgrade())
    except Exception as error:
        errors.print(f"error: cannot prepare the database: {error}", highlight=False, markup=False)
        raise typer.Exit(1) from None


def _redacted(url: str) -> str:
    """A database URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in credentials else f"{user}@{host}"
    return scheme + sep + rest


def _register_commands() -> None:
    from aiguillage.cli.clients import clients_app
    from aiguillage.cli.demo import demo
    from aiguillage.cli.loadtest import loadtest
    from aiguillage.cli.worker import worker

    app.command()(demo)
    app.command()(loadtest)
    app.command()(worker)
    app.add_typer(clients_app, name="clients")


_register_commands()

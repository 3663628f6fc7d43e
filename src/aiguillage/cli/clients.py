"""`aiguillage clients`: OAuth2 clients of the transcription API (client credentials).

`create` prints the client secret and the webhook signing secret once; only a
hash of the client secret is stored.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from aiguillage.auth.oauth import NewClientSecrets, OAuthClient
from aiguillage.cli.keys import (
    CliError,
    ConfigOption,
    DatabaseUrlOption,
    JsonOption,
    fail,
    run_on_database,
)
from aiguillage.store.database import Database
from aiguillage.store.keys import MAX_PRIORITY
from aiguillage.store.oauth import OAuthRepository

clients_app = typer.Typer(
    help="Create and revoke OAuth2 clients of the transcription API.",
    no_args_is_help=True,
    add_completion=False,
)


@clients_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="The application using the client.")],
    org: Annotated[str, typer.Option("--org", help="Organisation that owns its jobs.")],
    priority: Annotated[
        int,
        typer.Option(min=0, max=MAX_PRIORITY, help="Priority of its jobs' LLM calls (0: batch)."),
    ] = 0,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a client; its secret and webhook secret are shown this once only."""

    async def work(database: Database) -> tuple[NewClientSecrets, OAuthClient]:
        try:
            return await OAuthRepository(database).create_client(
                name=name, organisation=org, priority=priority
            )
        except ValueError as error:
            raise CliError(str(error), exit_code=2) from None

    secrets, client = run_on_database(work, config, database_url)
    document = {
        "client_id": secrets.client_id,
        "client_secret": secrets.client_secret,
        "webhook_secret": secrets.webhook_secret,
        "name": client.name,
        "organisation": client.organisation,
        "priority": client.priority,
        "scopes": list(client.scopes),
    }
    if as_json:
        typer.echo(json.dumps(document))
        return
    for label, value in document.items():
        shown = " ".join(value) if isinstance(value, list) else value
        typer.echo(f"{label}: {shown}")
    typer.echo("Store client_secret and webhook_secret now: they are shown only once.")


@clients_app.command()
def revoke(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID")],
    config: ConfigOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke a client; its tokens stop working at once."""

    async def work(database: Database) -> bool:
        return await OAuthRepository(database).revoke_client(client_id)

    if not run_on_database(work, config, database_url):
        fail(f"no client {client_id}", 1)
    typer.echo(f"Revoked client {client_id}.")

"""`aiguillage demo`: the embedded default, end to end, on one machine.

Starts llama.cpp engines with SmolLM2 and a Whisper base transcription server on
loopback, writes a configuration for them, creates a demo key, prints how to call
the gateway, and serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from aiguillage.backends.local_engine import (
    SMOLLM2_SERVED_NAME,
    EngineUnavailable,
    LlamaCppServer,
    LocalServer,
)
from aiguillage.catalog.config import parse_config
from aiguillage.speech.server import LocalWhisperServer

console = Console()


def demo_config(
    engine_urls: list[str], database_url: str, whisper: LocalWhisperServer | None = None
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "database_url": database_url,
        "site": "local",
        "models": [
            {
                "name": "smollm2",
                "model": SMOLLM2_SERVED_NAME,
                "aliases": ["small"],
                "routing_strategy": "round-robin",
                "servers": [
                    {"url": url, "engine": "llamacpp", "max_concurrency": 2, "site": "local"}
                    for url in engine_urls
                ],
            }
        ],
    }
    if whisper is not None:
        settings["models"].append(
            {
                "name": "whisper-base",
                "model": whisper.served_name,
                "kind": "transcription",
                "aliases": ["whisper-1"],
                "servers": [{"url": whisper.url, "engine": "openai", "max_concurrency": 1}],
            }
        )
    return settings


def _create_demo_key(database_url: str) -> str:
    from aiguillage.store.database import Database
    from aiguillage.store.keys import KeyRepository

    async def create() -> str:
        database = Database(database_url)
        try:
            await database.upgrade()
            secret, _ = await KeyRepository(database).create(
                name="demo", organisation="demo", priority=10
            )
            return secret
        finally:
            await database.dispose()

    return asyncio.run(create())


def _usage_help(url: str, key: str) -> str:
    return f"""[bold]Gateway[/bold]  {url}
[bold]Demo key[/bold] {key}

[bold]curl[/bold]
  curl {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

[bold]Python (openai SDK)[/bold]
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="smollm2", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

[bold]Transcription[/bold]
  curl {url}/v1/audio/transcriptions -H "Authorization: Bearer {key}" \
    -F model=whisper-base -F file=@lecture.mp3 -F response_format=srt

Metrics: {url}/metrics   Ready: {url}/readyz   Stop: Ctrl-C"""


def demo(
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
    engines: Annotated[int, typer.Option(min=1, max=4, help="llama.cpp engines to start.")] = 2,
    whisper: Annotated[
        bool, typer.Option(help="Also start a Whisper base transcription server.")
    ] = True,
    workdir: Annotated[Path, typer.Option(help="Where config, database and logs go.")] = Path(
        ".run"
    ),
) -> None:
    """Run the embedded default: llama.cpp engines with SmolLM2, and the gateway in front."""
    from aiguillage.cli import serve

    workdir.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite+aiosqlite:///{(workdir / 'aiguillage.db').resolve()}"
    engines_started: list[LlamaCppServer] = [
        LlamaCppServer(log_file=workdir / f"engine-{index}.log") for index in range(engines)
    ]
    transcriber = LocalWhisperServer("base", log_file=workdir / "whisper.log") if whisper else None
    servers: list[LocalServer] = [*engines_started, *([transcriber] if transcriber else [])]
    try:
        with console.status(f"Starting {engines} llama.cpp engine(s) with SmolLM2..."):
            for server in servers:
                server.start()
        settings = demo_config(
            [server.url for server in engines_started], database_url, transcriber
        )
        parse_config(settings, "demo")  # the demo must be a valid configuration
        config_path = workdir / "demo.yaml"
        config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        key = _create_demo_key(database_url)
        (workdir / "demo-key.txt").write_text(key + "\n")
        console.rule("Aiguillage demo")
        console.print(_usage_help(f"http://127.0.0.1:{port}", key), soft_wrap=True)  # copyable
        console.rule()
        console.print(
            f"Configuration written to {config_path}; key saved in {workdir / 'demo-key.txt'}"
        )
        serve(
            config=config_path,
            host="127.0.0.1",
            port=port,
            workers=1,
            log_level="info",
            access_log=False,
        )
    except EngineUnavailable as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()

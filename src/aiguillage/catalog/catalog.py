"""The catalog: public model names and aliases, each with the backends that serve it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.backends.circuit import CircuitBreaker
from aiguillage.catalog.config import GatewayConfig, ModelConfig


@dataclass(slots=True)
class ModelEntry:
    """A model as clients see it, and where it runs."""

    name: str
    served_name: str
    aliases: tuple[str, ...]
    owned_by: str
    backends: tuple[Backend, ...]
    config: ModelConfig
    created: int = field(default_factory=lambda: int(time.time()))

    def as_openai(self) -> dict[str, object]:
        """The OpenAI `model` object, with our aliases as an extra field."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "aliases": list(self.aliases),
        }


class Catalog:
    """Looks models up by public name or alias; backends are shared between models."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self._by_public_name: dict[str, ModelEntry] = {}
        for entry in self._entries.values():
            for public in (entry.name, *entry.aliases):
                self._by_public_name[public] = entry

    @classmethod
    def from_config(
        cls, config: GatewayConfig, clock: Callable[[], float] = time.monotonic
    ) -> Catalog:
        backends: dict[tuple[str, str | None], Backend] = {}

        def backend_for(model: ModelConfig) -> tuple[Backend, ...]:
            found = []
            for server in model.servers:
                token = server.token.get_secret_value() if server.token else None
                key = (server.base_url, token)
                if key not in backends:
                    backends[key] = Backend(
                        server,
                        connect_timeout_s=config.connect_timeout_s,
                        read_timeout_s=config.first_byte_timeout_s,
                        circuit=CircuitBreaker(
                            config.circuit_failures, config.circuit_open_s, clock
                        ),
                    )
                found.append(backends[key])
                if model.critical:
                    backends[key].reserved_for_critical += model.reserved_concurrency
            return tuple(found)

        return cls(
            ModelEntry(
                name=model.name,
                served_name=model.served_name,
                aliases=tuple(model.aliases),
                owned_by=model.owned_by,
                backends=backend_for(model),
                config=model,
            )
            for model in config.models
        )

    def resolve(self, public_name: str) -> ModelEntry | None:
        return self._by_public_name.get(public_name)

    def visible_to(self, identity: ApiKeyRecord) -> list[ModelEntry]:
        return [entry for entry in self._entries.values() if identity.may_use(entry.name)]

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def backends(self) -> list[Backend]:
        """Every distinct backend, once."""
        unique: dict[int, Backend] = {}
        for entry in self._entries.values():
            for backend in entry.backends:
                unique[id(backend)] = backend
        return list(unique.values())

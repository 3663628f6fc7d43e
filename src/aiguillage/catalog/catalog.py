"""The catalog: public model names and aliases, each with the backends that serve it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.backends.circuit import CircuitBreaker
from aiguillage.catalog.config import GatewayConfig, ModelConfig, ServerConfig


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
        self._configured = {entry.name: entry.config for entry in self._entries.values()}
        self._factory = _BackendFactory(GatewayConfig(), time.monotonic)
        self._by_public_name: dict[str, ModelEntry] = {}
        for entry in self._entries.values():
            for public in (entry.name, *entry.aliases):
                self._by_public_name[public] = entry

    @classmethod
    def from_config(
        cls, config: GatewayConfig, clock: Callable[[], float] = time.monotonic
    ) -> Catalog:
        factory = _BackendFactory(config, clock)
        catalog = cls(
            ModelEntry(
                name=model.name,
                served_name=model.served_name,
                aliases=tuple(model.aliases),
                owned_by=model.owned_by,
                backends=factory.backends_for(model, model.servers),
                config=model,
            )
            for model in config.models
        )
        catalog._factory = factory
        for entry in catalog:
            _reserve(entry, entry.backends, 1)
        return catalog

    def apply_overrides(self, overrides: Mapping[str, Mapping[str, ServerConfig | None]]) -> bool:
        """Servers added or removed at run time, on top of each model's configured ones.

        `overrides` maps a model to server URL -> server (None: removed). A backend
        that stays keeps its object, hence its in-flight count and circuit.
        Returns whether any model's backends changed.
        """
        changed = False
        for entry in self._entries.values():
            base = self._configured.get(entry.name, entry.config).servers
            servers = _merged(base, overrides.get(entry.name, {}))
            backends = self._factory.backends_for(entry.config, servers)
            if backends != entry.backends:
                _reserve(entry, [b for b in backends if b not in entry.backends], 1)
                _reserve(entry, [b for b in entry.backends if b not in backends], -1)
                entry.backends = backends
                entry.config = entry.config.model_copy(update={"servers": servers})
                changed = True
        return changed

    def drop_unused(self) -> list[Backend]:
        """Forget the backends no model uses any more, and return them.

        Adding their URL again then gives a fresh backend rather than one whose
        connection pool the caller has closed.
        """
        return self._factory.keep_only(self.backends())

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


class _BackendFactory:
    """One `Backend` per (URL, token), shared by the models that name it."""

    def __init__(self, config: GatewayConfig, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._made: dict[tuple[str, str | None], Backend] = {}

    def backends_for(
        self, model: ModelConfig, servers: Iterable[ServerConfig]
    ) -> tuple[Backend, ...]:
        found = []
        for server in servers:
            token = server.token.get_secret_value() if server.token else None
            key = (server.base_url, token)
            if key not in self._made:
                config = self._config
                self._made[key] = Backend(
                    server,
                    connect_timeout_s=config.connect_timeout_s,
                    read_timeout_s=config.first_byte_timeout_s,
                    circuit=CircuitBreaker(
                        config.circuit_failures, config.circuit_open_s, self._clock
                    ),
                )
            found.append(self._made[key])
        return tuple(found)

    def keep_only(self, used: Iterable[Backend]) -> list[Backend]:
        """Forget every backend not in `used`; return the forgotten ones."""
        kept = {id(backend) for backend in used}
        dropped = [backend for backend in self._made.values() if id(backend) not in kept]
        self._made = {key: b for key, b in self._made.items() if id(b) in kept}
        return dropped


def _reserve(entry: ModelEntry, backends: Iterable[Backend], sign: int) -> None:
    """A critical model keeps `reserved_concurrency` slots on each of its backends."""
    if entry.config.critical:
        for backend in backends:
            backend.reserved_for_critical += sign * entry.config.reserved_concurrency


def _merged(
    base: Iterable[ServerConfig], overrides: Mapping[str, ServerConfig | None]
) -> list[ServerConfig]:
    """The configured servers minus the removed ones, plus the added ones (by URL)."""
    servers = [server for server in base if server.base_url not in overrides]
    servers += [server for server in overrides.values() if server is not None]
    return servers

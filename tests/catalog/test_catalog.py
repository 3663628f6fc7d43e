"""The catalog: lookup by name or alias, visibility per key, shared backends, URL joining."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.backends.backend import Backend
from aiguillage.catalog.catalog import Catalog
from aiguillage.catalog.config import ServerConfig, parse_config

IDENTITY = ApiKeyRecord(
    id=1,
    name="k",
    organisation="o",
    prefix="sk-ag-abcdef",
    priority=0,
    queue_threshold=0,
    allowed_models=None,
    is_admin=False,
    expires_at=None,
    revoked=False,
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
)

CONFIG = {
    "models": [
        {
            "name": "llama",
            "model": "meta/llama-3",
            "aliases": ["llama3", "default"],
            "servers": [{"url": "http://gpu1:8000/v1"}, {"url": "http://gpu2:8000/v1"}],
        },
        {"name": "mistral", "servers": [{"url": "http://gpu1:8000/v1/"}]},
        {"name": "qwen", "servers": [{"url": "http://gpu3:8000"}]},
    ]
}


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.from_config(parse_config(CONFIG))


def test_resolve_by_name(catalog: Catalog) -> None:
    entry = catalog.resolve("llama")
    assert entry is not None
    assert (entry.name, entry.served_name) == ("llama", "meta/llama-3")
    assert [b.base_url for b in entry.backends] == ["http://gpu1:8000/v1", "http://gpu2:8000/v1"]


@pytest.mark.parametrize("alias", ["llama3", "default"])
def test_resolve_by_alias_gives_the_same_entry(catalog: Catalog, alias: str) -> None:
    assert catalog.resolve(alias) is catalog.resolve("llama")


def test_resolve_unknown_is_none(catalog: Catalog) -> None:
    assert catalog.resolve("gpt-4") is None
    assert catalog.resolve("meta/llama-3") is None  # the served name is not public


def test_served_name_defaults_to_public_name(catalog: Catalog) -> None:
    entry = catalog.resolve("qwen")
    assert entry is not None
    assert entry.served_name == "qwen"


def test_visible_to_unrestricted_key_lists_every_model(catalog: Catalog) -> None:
    assert [e.name for e in catalog.visible_to(IDENTITY)] == ["llama", "mistral", "qwen"]


def test_visible_to_filters_by_allowed_models(catalog: Catalog) -> None:
    identity = replace(IDENTITY, allowed_models=("qwen", "llama"))
    assert [e.name for e in catalog.visible_to(identity)] == ["llama", "qwen"]


def test_visible_to_key_allowed_nothing_is_empty(catalog: Catalog) -> None:
    assert catalog.visible_to(replace(IDENTITY, allowed_models=())) == []


def test_models_on_the_same_server_share_one_backend(catalog: Catalog) -> None:
    llama, mistral = catalog.resolve("llama"), catalog.resolve("mistral")
    assert llama is not None and mistral is not None
    assert llama.backends[0] is mistral.backends[0]
    assert len(catalog.backends()) == 3


def test_same_url_with_different_tokens_gives_distinct_backends() -> None:
    config = parse_config(
        {
            "models": [
                {"name": "a", "servers": [{"url": "http://gpu1:8000", "token": "t1"}]},
                {"name": "b", "servers": [{"url": "http://gpu1:8000", "token": "t2"}]},
            ]
        }
    )
    catalog = Catalog.from_config(config)
    a, b = catalog.resolve("a"), catalog.resolve("b")
    assert a is not None and b is not None
    assert a.backends[0] is not b.backends[0]
    assert b.backends[0].auth_headers == [("Authorization", "Bearer t2")]


def test_as_openai_lists_aliases(catalog: Catalog) -> None:
    entry = catalog.resolve("llama")
    assert entry is not None
    document = entry.as_openai()
    assert (document["id"], document["object"], document["aliases"]) == (
        "llama",
        "model",
        ["llama3", "default"],
    )


def backend(url: str) -> Backend:
    return Backend(ServerConfig(url=url), connect_timeout_s=1.0, read_timeout_s=1.0)


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("http://h:8000/v1", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1/", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
        ("http://h:8000", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/", "/v1/models", "http://h:8000/v1/models"),
        (
            "https://api.example/openai/v1",
            "/v1/embeddings",
            "https://api.example/openai/v1/embeddings",
        ),
        ("http://h:8000", "/health", "http://h:8000/health"),
    ],
)
def test_backend_url_joins_base_and_path(base: str, path: str, expected: str) -> None:
    assert backend(base).url(path) == expected


def test_backend_name_is_host_and_port() -> None:
    assert backend("http://gpu1:8000/v1").name == "gpu1:8000/v1"
    assert backend("https://gpu1").name == "gpu1:443"


def test_backend_without_token_sends_no_authorization() -> None:
    assert backend("http://h:8000").auth_headers == []


def _urls(catalog: Catalog, model: str) -> list[str]:
    entry = catalog.resolve(model)
    assert entry is not None
    return [backend.base_url for backend in entry.backends]


def test_overrides_add_and_remove_servers_on_top_of_the_configured_ones(catalog: Catalog) -> None:
    kept = catalog.resolve("llama")
    assert kept is not None
    gpu2 = kept.backends[1]
    changed = catalog.apply_overrides(
        {
            "llama": {
                "http://gpu1:8000/v1": None,
                "http://gpu4:8000": ServerConfig(url="http://gpu4:8000"),  # type: ignore[arg-type]
            }
        }
    )
    assert changed
    assert _urls(catalog, "llama") == ["http://gpu2:8000/v1", "http://gpu4:8000"]
    assert kept.backends[0] is gpu2  # a backend that stays keeps its state
    assert _urls(catalog, "mistral") == ["http://gpu1:8000/v1"]  # other models untouched
    assert len(catalog.backends()) == 4


def test_overrides_are_applied_from_the_configuration_not_cumulatively(catalog: Catalog) -> None:
    catalog.apply_overrides({"qwen": {"http://gpu3:8000": None}})
    assert _urls(catalog, "qwen") == []
    assert catalog.apply_overrides({}) is True  # the removal was undone in the database
    assert _urls(catalog, "qwen") == ["http://gpu3:8000"]
    assert catalog.apply_overrides({}) is False


def test_a_critical_model_reserves_slots_on_added_servers_and_frees_removed_ones() -> None:
    catalog = Catalog.from_config(
        parse_config(
            {
                "models": [
                    {
                        "name": "critical",
                        "critical": True,
                        "reserved_concurrency": 2,
                        "servers": [{"url": "http://gpu1:8000"}],
                    }
                ]
            }
        )
    )
    entry = catalog.resolve("critical")
    assert entry is not None
    first = entry.backends[0]
    catalog.apply_overrides(
        {
            "critical": {
                "http://gpu1:8000": None,
                "http://gpu2:8000": ServerConfig(url="http://gpu2:8000"),  # type: ignore[arg-type]
            }
        }
    )
    assert first.reserved_for_critical == 0
    assert entry.backends[0].reserved_for_critical == 2

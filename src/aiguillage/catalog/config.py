"""The gateway's YAML configuration, in the shape of the ILaaS Helm values.

Loading is strict on purpose: an operator who mistypes a field must learn which
file, which field and what was expected before the gateway starts, not from a
confused user an hour later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from aiguillage.dispatch.redis_connection import check_scheduler_url

EngineKind = Literal["vllm", "sglang", "tgi", "llamacpp", "ollama", "lmdeploy", "openai"]
RoutingStrategy = Literal[
    "round-robin", "weighted", "least-busy", "latency", "prefix-affinity", "owner-first"
]
QosPolicyName = Literal["none", "parallel-threshold", "performance"]
# What a model does, hence which routes may use it: the chat, completion and embedding
# routes refuse a transcription model and `/v1/audio/transcriptions` takes only those.
ModelKind = Literal["chat", "completion", "embedding", "transcription"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./aiguillage.db"
DATABASE_URL_ENV = "AIGUILLAGE_DATABASE_URL"
SECRETS_KEY_ENV = "AIGUILLAGE_SECRETS_KEY"
SECRETS_KEY_MIN_LENGTH = 16

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration that cannot be used, with a message an operator can act on."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """One OpenAI-compatible engine serving a model."""

    url: AnyHttpUrl
    token: SecretStr | None = None
    engine: EngineKind = "openai"
    max_concurrency: Annotated[int, Field(ge=1, le=100_000)] = 16
    weight: Annotated[float, Field(gt=0)] = 1.0
    site: str | None = None
    owner: str | None = None
    owner_reserved: Annotated[int, Field(ge=0)] = 0  # slots only the owner's requests may use
    priority_scheduling: bool = False  # a vLLM started with --scheduling-policy priority

    @model_validator(mode="after")
    def _reservation_fits(self) -> ServerConfig:
        if self.owner_reserved and not self.owner:
            raise ValueError("owner_reserved needs an owner")
        if self.owner_reserved > self.max_concurrency:
            raise ValueError("owner_reserved cannot exceed max_concurrency")
        return self

    @property
    def base_url(self) -> str:
        """The URL without a trailing slash, so that paths join cleanly."""
        return str(self.url).rstrip("/")


class PriorityShare(_Strict):
    """Requests of at least `min_priority` may use up to `share` of a backend's concurrency."""

    min_priority: Annotated[int, Field(ge=0)]
    share: Annotated[float, Field(gt=0, le=1)]


class QosConfig(_Strict):
    """Whether a backend may take a request of a given priority now (see docs/dispatch.md)."""

    policy: QosPolicyName = "none"
    # parallel-threshold: the share of concurrency each priority level may use
    shares: list[PriorityShare] = Field(
        default_factory=lambda: [
            PriorityShare(min_priority=0, share=0.5),
            PriorityShare(min_priority=5, share=0.8),
            PriorityShare(min_priority=10, share=1.0),
        ]
    )
    # performance: requests below protected_priority only while the backend is fast enough
    protected_priority: Annotated[int, Field(ge=0)] = 10
    ttft_target_s: Annotated[float, Field(gt=0)] = 1.0
    engine_queue_target: Annotated[int, Field(ge=0)] = 0

    def share_for(self, priority: int) -> float:
        """The largest share granted to this priority (1.0 when no rule applies)."""
        shares = [rule.share for rule in self.shares if priority >= rule.min_priority]
        return max(shares) if shares else 1.0


class ModelConfig(_Strict):
    """A public model name and the engines that serve it."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    model: str | None = None  # name served by the engines; defaults to `name`
    kind: ModelKind = "chat"
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    routing_strategy: RoutingStrategy = "round-robin"
    qos: QosConfig = Field(default_factory=QosConfig)
    queue_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    prefix_chars: Annotated[int, Field(ge=16)] = 512  # prompt prefix hashed by prefix-affinity
    critical: bool = False  # keeps reserved capacity on shared backends; alerts when degraded
    reserved_concurrency: Annotated[int, Field(ge=0)] = 0  # per backend, for a critical model
    min_healthy_backends: Annotated[int, Field(ge=0)] = 1
    owned_by: str = "aiguillage"
    servers: Annotated[list[ServerConfig], Field(min_length=1)]

    @property
    def served_name(self) -> str:
        return self.model or self.name


class TranscriberConfig(_Strict):
    """Which speech-to-text engine the transcription step uses.

    `local`: faster-whisper in the worker's process (`model`: "base", "tiny.en"...).
    `openai`: an OpenAI-compatible `/v1/audio/transcriptions` at `url` (a catalog backend).
    """

    engine: Literal["local", "openai"] = "local"
    model: Annotated[str, Field(min_length=1)] = "base"
    url: AnyHttpUrl | None = None
    api_key: SecretStr | None = None

    @model_validator(mode="after")
    def _url_for_remote(self) -> TranscriberConfig:
        if self.engine == "openai" and self.url is None:
            raise ValueError("engine 'openai' needs a url")
        return self


class JobsLlmConfig(_Strict):
    """How workers reach an LLM for translation and enrichment: the gateway's own API.

    The key's priority is a ceiling; each call asks for its job owner's priority.
    """

    gateway_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    api_key: SecretStr | None = None
    model: Annotated[str, Field(min_length=1)] = "smollm2"
    max_tokens: Annotated[int, Field(ge=16)] = 512
    timeout_s: Annotated[float, Field(gt=0)] = 300.0
    attempts: Annotated[int, Field(ge=1, le=10)] = 3  # an answer that fails validation is re-asked


class WebhookConfig(_Strict):
    """Delivery of job events to the client's callback URL."""

    every_state: bool = False  # default: terminal states only (a job may ask for every state)
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=50)] = 8
    backoff_s: Annotated[float, Field(gt=0)] = 2.0  # doubled after each failed attempt


class JobsConfig(_Strict):
    """Asynchronous speech-to-text jobs: storage, limits, workers, LLM and webhooks."""

    storage_dir: Path = Path("./aiguillage-media")
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024**3
    allow_private_urls: bool = False  # media URLs on loopback or private networks (SSRF)
    fetch_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    token_ttl_s: Annotated[int, Field(ge=60, le=7 * 86400)] = 3600
    lease_s: Annotated[float, Field(ge=1)] = 60.0  # a dead worker's job is retaken after this
    poll_interval_s: Annotated[float, Field(gt=0)] = 1.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3  # per step
    retry_backoff_s: Annotated[float, Field(ge=0)] = 5.0  # doubled after each failed attempt
    stop_grace_s: Annotated[float, Field(ge=0)] = 30.0  # SIGTERM: finish within this, or hand back
    upload_timeout_s: Annotated[float, Field(ge=60)] = 6 * 3600.0  # then an UPLOADING job fails
    transcriber: TranscriberConfig = Field(default_factory=TranscriberConfig)
    llm: JobsLlmConfig = Field(default_factory=JobsLlmConfig)
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)


class GatewayConfig(_Strict):
    """Everything `aiguillage serve` needs, with defaults for the embedded setup."""

    database_url: str | None = None
    # seals the engine tokens that the admin API stores (store/sealing.py); the same on
    # every replica. Without it, servers with a token cannot be added at run time.
    secrets_key: Annotated[SecretStr, Field(min_length=SECRETS_KEY_MIN_LENGTH)] | None = None
    # GET /metrics asks for "Authorization: Bearer <metrics_token>" when set (Prometheus's
    # `authorization` scrape setting); unset, it is open, for a network the operator guards
    metrics_token: Annotated[SecretStr, Field(min_length=16)] | None = None
    # redis://host:port/db shares queues, leases and caps between gateway replicas;
    # unset, the in-process scheduler serves this process alone
    scheduler_url: str | None = None
    # a killed replica's slots come back within about this time (its leases are no longer
    # renewed); shorter frees them sooner, at the cost of more renewals
    scheduler_lease_ttl_s: Annotated[float, Field(ge=2, le=60)] = 8.0
    site: str | None = None  # this gateway's datacentre: its backends are preferred at equal load
    max_body_bytes: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024
    max_audio_bytes: Annotated[int, Field(ge=1024)] = 25 * 1024 * 1024  # OpenAI's own limit
    key_cache_ttl_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 3.0
    first_byte_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    health_interval_s: Annotated[float, Field(gt=0)] = 10.0
    signals_interval_s: Annotated[float, Field(gt=0)] = 2.0  # engine /metrics scrapes
    circuit_failures: Annotated[int, Field(ge=1)] = 3  # consecutive failures that open it
    circuit_open_s: Annotated[float, Field(gt=0)] = 10.0  # then one trial request
    lease_ttl_s: Annotated[float, Field(gt=0)] = 3600.0  # safety net for a lost release
    ledger_flush_interval_s: Annotated[float, Field(gt=0)] = 1.0
    ledger_batch_size: Annotated[int, Field(ge=1)] = 500
    models: list[ModelConfig] = Field(default_factory=list)
    jobs: JobsConfig = Field(default_factory=JobsConfig)

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("sqlite+aiosqlite://", "postgresql+asyncpg://")
        ):
            raise ValueError(
                "expected 'sqlite+aiosqlite:///PATH' or 'postgresql+asyncpg://USER@HOST/DB'"
            )
        return value

    @field_validator("scheduler_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_scheduler_url(value)
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        seen: dict[str, str] = {}
        for model in self.models:
            for public in (model.name, *model.aliases):
                if public in seen:
                    raise ValueError(
                        f"model name or alias {public!r} is used twice "
                        f"(by {seen[public]!r} and {model.name!r})"
                    )
                seen[public] = model.name
        return self

    def resolved_secrets_key(self) -> str | None:
        """The key that seals stored engine tokens: the environment wins over the file."""
        key = os.environ.get(SECRETS_KEY_ENV)
        if key is None and self.secrets_key is not None:
            key = self.secrets_key.get_secret_value()
        if key is not None and len(key) < SECRETS_KEY_MIN_LENGTH:
            raise ConfigError(
                f"{SECRETS_KEY_ENV}: the secrets key needs "
                f"{SECRETS_KEY_MIN_LENGTH} characters or more"
            )
        return key

    def resolved_database_url(self) -> str:
        """The database URL: the environment wins over the file, then the default."""
        return os.environ.get(DATABASE_URL_ENV) or self.database_url or DEFAULT_DATABASE_URL


def interpolate_env(value: Any, where: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where or 'value'}: environment variable {name} is not set")

        return _ENV_REFERENCE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate_env(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {
            key: interpolate_env(item, f"{where}.{key}" if where else str(key))
            for key, item in value.items()
        }
    return value


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    """Validate an already parsed YAML tree; errors name the source and the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        data = interpolate_env(data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            field = _location(tuple(item["loc"]))
            got = item.get("input")
            secret_like = any(word in field.lower() for word in ("token", "password", "secret"))
            quiet = secret_like or item["type"] == "extra_forbidden" or isinstance(got, dict | list)
            shown = "" if quiet or got is None else f" (got {got!r})"
            lines.append(f"  {field}: {item['msg']}{shown}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML configuration file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{file}: cannot read configuration: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from None
    return parse_config(data, str(file))

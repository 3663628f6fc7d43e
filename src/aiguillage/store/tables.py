"""The database schema, as SQLAlchemy Core tables.

Migrations (store/migrations/versions) create this schema; a test checks that
the two never drift apart. Core rather than the ORM: the gateway only needs a
few plain queries, and Core keeps them cheap on the hot path.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as timezone-aware UTC, on every database.

    SQLite has no time zones: its DATETIME drops the offset, so an aware value in
    another zone would be stored as the wrong instant. Everything is therefore
    converted to UTC before storage (naive values are taken to be UTC already),
    and values read back without a zone get UTC attached.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive value is assumed to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("organisation", String(255), nullable=False),
    Column("prefix", String(32), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("priority", Integer, nullable=False),
    Column("queue_threshold", Integer, nullable=False),
    Column("allowed_models", JSON(none_as_null=True), nullable=True),  # NULL: every model
    Column("is_admin", Boolean, nullable=False),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("revoked", Boolean, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("routing_mode", String(16), nullable=False, server_default="any"),
    sqlite_autoincrement=True,  # never reuse an id: usage rows keep pointing at it
)

# Free-form text columns have no length: a row the ledger cannot insert (say, a
# client sent a 300-character model name) would block every row behind it.
# There is no foreign key to api_keys either, for the same reason: the ledger is
# an append-only log and must accept every row it is given.
usage = Table(
    "usage",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("started_at", UtcDateTime, nullable=False),
    Column("request_id", String, nullable=False),
    Column("key_id", Integer, nullable=True),
    Column("organisation", String, nullable=True),
    Column("model", String, nullable=False),
    Column("backend", String, nullable=True),
    Column("endpoint", String, nullable=False),
    Column("status", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("cancelled", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("usage_source", String(16), nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("duration_ms", Float, nullable=False),
    Index("ix_usage_started_at", "started_at"),
    Index("ix_usage_key_id_started_at", "key_id", "started_at"),
    Index("ix_usage_organisation_started_at", "organisation", "started_at"),
    Index("ix_usage_model_started_at", "model", "started_at"),
)

# OAuth2 client credentials (the transcription API). Secrets and tokens are stored as
# SHA-256 hashes only; the webhook secret is kept as is because signing needs it.
oauth_clients = Table(
    "oauth_clients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_id", String(64), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False),
    Column("name", String(255), nullable=False),
    Column("organisation", String(255), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("webhook_secret", String(128), nullable=False),
    Column("revoked", Boolean, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    sqlite_autoincrement=True,
)

oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("client", Integer, nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_oauth_tokens_expires_at", "expires_at"),
)

# One row per transcription job. The state column is the queue: workers claim rows in a
# WAITING_* state (or a running state whose lease expired) and hold them with a lease.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("client", Integer, nullable=False),
    Column("organisation", String(255), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("options", JSON, nullable=False),
    Column("source_url", String, nullable=True),
    Column("media_name", String, nullable=True),
    Column("media_bytes", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_until", UtcDateTime, nullable=True),
    Column("failed_step", String(32), nullable=True),
    Column("failure_cause", String, nullable=True),
    Column("transcript", JSON, nullable=True),
    Column("translations", JSON, nullable=True),  # language -> transcript
    Column("enrichment", JSON, nullable=True),  # item -> validated answer
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_jobs_state_priority_created_at", "state", "priority", "created_at"),
    Index("ix_jobs_client_created_at", "client", "created_at"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(40), nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", String, nullable=True),
    Index("ix_job_events_job_id_id", "job_id", "id"),
)

# A durable outbox: a worker that dies mid-delivery leaves the row for the next one.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(40), nullable=False),
    Column("event", String(32), nullable=False),
    Column("url", String, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("idempotency_key", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("lease_until", UtcDateTime, nullable=True),
    Column("log", JSON, nullable=False),  # one entry per attempt: at, status code, error
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_job_id", "job_id"),
)

# Servers added or removed at run time through the admin API, on top of the
# configuration file: every replica applies them at start and when notified.
# `config` NULL means "removed" (a server of the file that must not be used).
catalog_servers = Table(
    "catalog_servers",
    metadata,
    Column("model", String(256), primary_key=True),
    Column("url", String(2048), primary_key=True),
    Column("config", JSON(none_as_null=True), nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
)

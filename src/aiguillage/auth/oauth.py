"""OAuth2 client credentials for the transcription API: clients, secrets and bearer tokens.

Why opaque random tokens stored hashed, and not signed JWTs: every job route reads
the database anyway (the job itself), so a token lookup by hash costs one indexed
query more and buys what JWTs lack: a revoked client loses its tokens at once, no
signing key has to be shared between gateway replicas and rotated, and a leaked
database holds no usable token (only SHA-256 hashes of 256-bit secrets; see
auth/keys.py for why a fast unsalted hash is right for random secrets).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime

from aiguillage.auth.keys import hash_key

CLIENT_ID_PREFIX = "agc-"
CLIENT_SECRET_PREFIX = "ags-"
TOKEN_PREFIX = "agt-"
WEBHOOK_SECRET_PREFIX = "whsec-"
SCOPE_READ = "transcriptions:read"
SCOPE_WRITE = "transcriptions:write"
ALL_SCOPES = (SCOPE_READ, SCOPE_WRITE)


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """A client application: whose jobs it owns, at which priority. No secret is held."""

    id: int
    client_id: str
    name: str
    organisation: str
    priority: int
    scopes: tuple[str, ...]
    webhook_secret: str = field(repr=False)  # signs webhooks; authorises nothing
    revoked: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewClientSecrets:
    """What `clients create` prints once: the client secret and the webhook signing secret."""

    client_id: str
    client_secret: str = field(repr=False)
    webhook_secret: str = field(repr=False)

    @property
    def secret_hash(self) -> str:
        return hash_key(self.client_secret)


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token as the client gets it (the secret), with what it allows."""

    token: str = field(repr=False)
    scopes: tuple[str, ...]
    expires_in: int

    @property
    def token_hash(self) -> str:
        return hash_key(self.token)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a job route: the client behind a valid token, and the token's scopes."""

    client: OAuthClient
    scopes: tuple[str, ...]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


def new_client_secrets() -> NewClientSecrets:
    return NewClientSecrets(
        client_id=CLIENT_ID_PREFIX + secrets.token_hex(12),
        client_secret=CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32),
        webhook_secret=WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32),
    )


def new_access_token(scopes: tuple[str, ...], ttl_s: int) -> AccessToken:
    return AccessToken(
        token=TOKEN_PREFIX + secrets.token_urlsafe(32), scopes=scopes, expires_in=ttl_s
    )


def granted_scopes(requested: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    """The scopes to grant for a `scope` parameter (RFC 6749 §3.3), or None if one is not allowed.

    No parameter means every scope the client has.
    """
    if requested is None or not requested.strip():
        return allowed
    wanted = tuple(dict.fromkeys(requested.split()))
    if not set(wanted) <= set(allowed):
        return None
    return wanted

"""Bearer key → identity, from an in-memory cache so the hot path never waits on the database.

Entries live `ttl_s` seconds: a key revoked in the database stops working
within that time on every process. While the database is unreachable, entries up to
`STALE_IF_ERROR_S` old keep answering, so an outage does not lock users out.
Unknown keys are cached too, so a client hammering with a wrong key costs one
query per TTL, not one per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiguillage.api.errors import ApiError, unauthorized
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.auth.keys import hash_key

KeyLookup = Callable[[str], Awaitable[ApiKeyRecord | None]]
Clock = Callable[[], float]

MAX_CACHED_KEYS = 100_000
# While the key store is unreachable, an entry this recent still answers: a database
# outage must not lock out every user whose key was valid a moment ago.
STALE_IF_ERROR_S = 600.0


class Authenticator:
    def __init__(self, lookup: KeyLookup, ttl_s: float, clock: Clock = time.monotonic) -> None:
        self._lookup = lookup
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        self._pending: dict[str, asyncio.Future[ApiKeyRecord | None]] = {}

    async def authenticate(self, authorization: str | None) -> ApiKeyRecord:
        """The identity behind an `Authorization` header, or a 401 `ApiError`."""
        secret = _bearer_secret(authorization)
        record = await self._record(hash_key(secret))
        if record is None:
            raise unauthorized("Incorrect API key provided.")
        if record.revoked:
            raise unauthorized("This API key has been revoked.", code="revoked_api_key")
        if record.is_expired():
            raise unauthorized("This API key has expired.", code="expired_api_key")
        return record

    def forget(self, key_hash: str | None = None) -> None:
        """Drop one key's cached entry, or every entry (after an admin change)."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    async def _record(self, key_hash: str) -> ApiKeyRecord | None:
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        pending = self._pending.get(key_hash)
        if pending is not None:  # one database query per key, however many requests wait
            try:
                return await asyncio.shield(pending)
            except _LookupAbandoned:
                return await self._record(key_hash)  # its caller left: look it up ourselves
            except asyncio.CancelledError:
                raise
            except Exception:
                raise _store_unreachable() from None
        future: asyncio.Future[ApiKeyRecord | None] = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = future
        try:
            record = await self._lookup(key_hash)
        except BaseException as error:
            abandoned = not isinstance(error, Exception)  # cancelled: its client went away
            if not abandoned and cached is not None and now - cached[1] < STALE_IF_ERROR_S:
                future.set_result(cached[0])  # the waiters get the last known answer too
                return cached[0]
            future.set_exception(_LookupAbandoned() if abandoned else error)
            future.exception()  # the waiters, if any, see it; nobody else must log it
            if abandoned:
                raise
            raise _store_unreachable() from None
        finally:
            del self._pending[key_hash]
        future.set_result(record)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[key_hash] = (record, now + self._ttl)
        return record


class _LookupAbandoned(Exception):
    """The request doing a shared lookup was cancelled; its waiters must retry."""


def _store_unreachable() -> ApiError:
    return ApiError(
        503,
        "The key store is unreachable; retry shortly.",
        type="service_unavailable",
        code="auth_unavailable",
        headers={"retry-after": "2"},
    )


def _bearer_secret(authorization: str | None) -> str:
    if not authorization:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized(
            "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_authorization"
        )
    return secret

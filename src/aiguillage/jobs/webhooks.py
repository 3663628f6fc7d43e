"""Telling a client's callback URL that its job changed state: signed, idempotent, retried.

Each delivery is a row of a durable outbox written in the same transaction as
the state change (see store/jobs.py), so a crash never loses one. A receiver
checks `X-Aiguillage-Signature: sha256=<hex>`, the HMAC-SHA256 of
`<X-Aiguillage-Timestamp>.<body>` keyed with its client's webhook secret, and
drops repeats by `Idempotency-Key` (a retry after a lost answer resends the same key).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import aiohttp
import orjson

from aiguillage.catalog.config import WebhookConfig
from aiguillage.jobs.urls import UrlRefused, check_url
from aiguillage.store.jobs import JobRepository, RetryPolicy

SIGNATURE_HEADER = "X-Aiguillage-Signature"
TIMESTAMP_HEADER = "X-Aiguillage-Timestamp"

log = logging.getLogger(__name__)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp` (seconds, as text)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookSender:
    """Sends due deliveries from the outbox, one at a time, and logs every attempt."""

    def __init__(
        self, repository: JobRepository, config: WebhookConfig, *, allow_private: bool
    ) -> None:
        self._repository = repository
        self._config = config
        self._allow_private = allow_private
        self._retry = RetryPolicy(max_attempts=config.max_attempts, backoff_s=config.backoff_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send_one(self) -> bool:
        """Send one due delivery, if any; whether there was one."""
        claimed = await self._repository.claim_webhook(lease_s=self._config.timeout_s * 3)
        if claimed is None:
            return False
        delivery, secret = claimed
        body = orjson.dumps(delivery.payload)
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "idempotency-key": delivery.idempotency_key,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(secret, timestamp, body),
        }
        status: int | None = None
        error: str | None = None
        try:
            await check_url(delivery.url, allow_private=self._allow_private)
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._config.timeout_s)
                )
            async with self._session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
        except UrlRefused as refused:
            error = str(refused)
        except (aiohttp.ClientError, TimeoutError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        failures = delivery.attempts + 1
        again = error is not None and failures < self._retry.max_attempts
        await self._repository.webhook_attempted(
            delivery,
            status_code=status,
            error=error,
            retry_in=self._retry.delay(failures) if again else None,
        )
        if error is not None:
            log.warning("webhook for job %s: attempt %d failed", delivery.job_id, failures)
        return True

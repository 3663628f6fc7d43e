"""API key secrets: how they are made and how they are hashed for storage.

A secret is `sk-ag-` followed by 43 URL-safe characters (32 random bytes from
`secrets`). Only its SHA-256 hash is stored, with a short prefix that lets an
operator recognise a key in listings.

Why a fast hash and no salt, and not bcrypt/argon2: slow, salted hashes exist to
protect low-entropy passwords from guessing. A 256-bit random secret cannot be
guessed or brute-forced from its hash, whatever the hash speed, so a slow hash
would add no security. It would cost a lot, though: the gateway hashes the
bearer secret of every request, and an unsalted hash is what makes lookup by
hash (one indexed query, one cache entry per key) possible.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

SECRET_PREFIX = "sk-ag-"
PREFIX_LENGTH = 12  # `sk-ag-` and 6 random characters: enough to tell keys apart by eye
_RANDOM_BYTES = 32  # 256 bits, 43 characters of URL-safe base64


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A new key: the secret to hand out once, and what is stored instead of it."""

    secret: str = field(repr=False)  # kept out of repr() so that logs never show it
    prefix: str
    hash: str


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest of a secret: what the database stores and is searched by."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_key() -> GeneratedKey:
    """A fresh random secret with its display prefix and its hash."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)
    return GeneratedKey(secret=secret, prefix=secret[:PREFIX_LENGTH], hash=hash_key(secret))

"""Key secrets: their format, their prefix, and the hash the database stores."""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import FrozenInstanceError

import pytest

from aiguillage.auth.keys import generate_key, hash_key

URL_SAFE = set(string.ascii_letters + string.digits + "-_")


def test_secret_format_prefix_and_hash() -> None:
    key = generate_key()
    assert re.fullmatch(r"sk-ag-[A-Za-z0-9_-]{43}", key.secret)
    assert set(key.secret[6:]) <= URL_SAFE
    assert key.prefix == key.secret[:12]
    assert key.hash == hashlib.sha256(key.secret.encode()).hexdigest()
    assert key.hash == hash_key(key.secret)


def test_hash_is_sha256_hex() -> None:
    # FIPS 180-2 test vector for "abc"
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key("sk-ag-anything"))


def test_secrets_are_random() -> None:
    keys = [generate_key() for _ in range(2000)]
    assert len({key.secret for key in keys}) == 2000
    assert len({key.hash for key in keys}) == 2000
    assert len({key.prefix for key in keys}) > 1900  # 6 random characters tell keys apart


def test_repr_never_shows_the_secret() -> None:
    key = generate_key()
    assert key.secret not in repr(key)
    assert key.secret[6:] not in str(key)
    assert key.prefix in repr(key)


def test_generated_key_is_immutable() -> None:
    key = generate_key()
    with pytest.raises(FrozenInstanceError):
        key.secret = "sk-ag-other"  # type: ignore[misc]

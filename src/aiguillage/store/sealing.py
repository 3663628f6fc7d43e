"""Secrets the store must give back (engines' tokens), sealed with the operator's key.

API keys are stored as hashes: the gateway only ever compares them. An engine's
token has to be sent to the engine, so it cannot be hashed; what the admin API
stores is encrypted instead (Fernet: AES-CBC with an HMAC-SHA256 check), with a
key derived from `secrets_key`, so that a copy of the database (a backup, a
reporting replica) does not give the tokens away.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# The derivation's purpose: the same secrets_key used elsewhere gives another key.
_PURPOSE = b"aiguillage: engine tokens stored by the admin API"


class SecretsKeyMissing(ValueError):
    """A secret was to be stored but this gateway has no `secrets_key` to seal it with."""


class UnreadableSecret(ValueError):
    """A sealed secret that this key cannot open (another key, or altered)."""


class Sealer:
    """Seals and opens secrets with a key derived from the operator's passphrase."""

    def __init__(self, secrets_key: str) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(
            secrets_key.encode()
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except InvalidToken:
            raise UnreadableSecret("this secrets_key cannot open the stored secret") from None

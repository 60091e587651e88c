"""Secret redaction, written once: for the journal's audit rows and for every log line.

Secrets are found in the config (:func:`secrets_in`: every pydantic ``SecretStr``: MQTT and miner
passwords, command tokens, key passphrases) and replaced by ``***`` wherever they would appear:

* :func:`redact` makes a JSON-ready copy of a value (audit details): values under credential-like
  keys (password, token, secret, ...) and ``SecretStr`` values are masked, known secrets are cut
  out of every string;
* :func:`scrub` cuts known secrets out of one string (audit columns);
* :class:`Redactor` does the same for log records; it ignores "secrets" shorter than
  :data:`MIN_SECRET_LEN`, which would otherwise mask ordinary words and digits in every line.

Below both the journal and the outputs, so that each may import it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, SecretStr

REDACTED = "***"
MIN_SECRET_LEN = 4  # for log lines: shorter "secrets" would redact ordinary words and digits

# Keys whose values are credentials, matched on the key with camelCase and separators
# normalised to snake_case, so "mqtt_password", "apiKey" and "X-Auth-Token" all hit. It errs
# towards masking ("tokens_per_s" is masked too): a false positive costs one masked number in
# the audit, a false negative leaks a credential.
_SECRET_KEY = re.compile(
    r"(^|_)(pass|pwd|passwd|password|passphrase|secret|token|tokens|credential|credentials"
    r"|apikey|api_key|privatekey|private_key|authorization|auth|cookie|session_key|psk)(_|$)"
    r"|password|secret|token|credential|apikey|privatekey",
)


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a credential (its value is masked whatever it is)."""
    norm = re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    return _SECRET_KEY.search(norm) is not None


def secrets_in(value: Any) -> tuple[str, ...]:
    """Every ``SecretStr`` value inside a config model (for the journal and the log handler).

    Walks pydantic models, mappings and sequences; empty secrets are skipped (an empty string
    would "match" everywhere).
    """
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, SecretStr):
            secret = v.get_secret_value()
            if secret and secret not in found:
                found.append(secret)
        elif isinstance(v, BaseModel):
            for name in type(v).model_fields:
                walk(getattr(v, name))
        elif isinstance(v, Mapping):
            for item in v.values():
                walk(item)
        elif isinstance(v, list | tuple | set | frozenset):
            for item in v:
                walk(item)

    walk(value)
    return tuple(found)


def _longest_first(secrets: Iterable[str], min_len: int = 1) -> tuple[str, ...]:
    # Longest first, so a secret containing another is replaced whole.
    return tuple(sorted({s for s in secrets if len(s) >= min_len}, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every known secret replaced by ``***``."""
    for secret in _longest_first(secrets):
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, known_secrets: Iterable[str] = ()) -> Any:
    """A JSON-ready copy of ``value`` with every credential replaced by ``"***"``.

    Masks values under credential-like keys, ``SecretStr`` values, and each string of
    ``known_secrets`` wherever it occurs inside a string. Non-finite floats become strings
    (JSON has no NaN); datetimes become ISO text; dataclasses and pydantic models become dicts.
    """
    return _redact(value, _longest_first(known_secrets))


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Enum):
        return _redact(value.value, secrets)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, BaseModel):
        return _redact(dict(value), secrets)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _redact(fields, secrets)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = scrub(str(k), secrets)
            out[key] = REDACTED if is_secret_key(str(k)) else _redact(v, secrets)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return scrub(str(value), secrets)


class Redactor:
    """Cuts known secrets out of log text and log fields (secrets shorter than 4 are ignored)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = _longest_first(secrets, MIN_SECRET_LEN)

    def text(self, value: str) -> str:
        return scrub(value, self.secrets) if self.secrets else value

    def value(self, value: Any) -> Any:
        """A log field with secrets cut out (structure kept: logs format it themselves)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        if isinstance(value, SecretStr):
            return REDACTED
        return value

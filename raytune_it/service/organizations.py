"""Who a request comes from: the organization whose API key it carries.

``serve.api_keys_file`` maps organization names to keys (one, or a list), each written as the key or as
``sha256:<hex>``; ``serve.api_key`` (or RAYTUNE_IT_API_KEY) is the organization ``default``. Only SHA-256
digests leave the driver: replicas compare the digest of the key a request sends, so no key is stored in
the app's state, its config or its logs. With no key configured at all, every request is ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from raytune_it.config.loading import parse_yaml
from raytune_it.errors import ConfigError

DEFAULT_ORGANIZATION = "default"
ORGANIZATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a segment of an ft: model name
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def _digest_of(entry: object, where: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{where}: a key must be a non-empty string (or sha256:<64 hex digits>)")
    match = _DIGEST.match(entry.strip())
    if entry.strip().startswith("sha256:") and not match:
        raise ConfigError(f"{where}: a digest is written sha256:<64 hex digits>")
    return match.group(1).lower() if match else key_digest(entry)


@dataclass(frozen=True)
class Organizations:
    """Key digests -> organization: picklable, so the ingress replicas get it from the driver."""

    digests: tuple[tuple[str, str], ...] = ()

    @property
    def open(self) -> bool:
        """No key configured: every request is the default organization."""
        return not self.digests

    def of_bearer(self, authorization: str) -> str | None:
        """The organization of an ``Authorization: Bearer <key>`` header, or None for a missing or wrong key."""
        if self.open:
            return DEFAULT_ORGANIZATION
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = key_digest(token).encode()
        found = None
        for known, organization in self.digests:  # every entry compared: the time says nothing of which matched
            if hmac.compare_digest(known.encode(), digest):
                found = organization
        return found

    @property
    def names(self) -> list[str]:
        return sorted({organization for _, organization in self.digests}) or [DEFAULT_ORGANIZATION]


def load_organizations(api_key: str | None, keys_file: str | None) -> Organizations:
    """On the driver: the single key and the keys file, as digests; a bad file is a ConfigError naming it."""
    pairs: list[tuple[str, str]] = []
    if api_key:
        pairs.append((key_digest(api_key), DEFAULT_ORGANIZATION))
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"serve.api_keys_file: cannot read {keys_file}: {reason}") from None
        data = parse_yaml(text, f"serve.api_keys_file: {keys_file}")
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"serve.api_keys_file: {keys_file} must map organization names to keys, e.g. "
                              "'acme: [sha256:<hex>]'")
        for name, keys in data.items():
            where = f"serve.api_keys_file: {keys_file}: organization {name!r}"
            if not isinstance(name, str) or not ORGANIZATION_NAME.match(name):
                raise ConfigError(f"{where}: a name is 1-64 letters, digits, '_' or '-', starting alphanumeric")
            for entry in keys if isinstance(keys, list) else [keys]:
                pairs.append((_digest_of(entry, where), name))
    seen: dict[str, str] = {}
    for digest, name in pairs:
        if seen.setdefault(digest, name) != name:
            raise ConfigError(f"serve.api_keys_file: one key is given to both {seen[digest]!r} and {name!r}")
    return Organizations(tuple(pairs))

"""Client authentication: a team key -> Principal. Keys are compared by SHA-256 digest."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import invalid_api_key
from gateway.settings import Team

CLIENT_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})


@dataclass(frozen=True, slots=True)
class Principal:
    team: Team
    key_id: str  # first 12 hex of the key's SHA-256: safe to log, useless to an attacker


def key_id(digest: bytes) -> str:
    """How a client key is named in the ledger, logs and spans: 12 hex of its digest."""
    return digest.hex()[:12]


def key_ids(team: Team) -> frozenset[str]:
    """The ids of the team's keys as configured now."""
    return frozenset(key_id(d) for d in team.key_digests)


class Authenticator:
    """Maps presented keys to teams. Holds only digests, never a key."""

    __slots__ = ("_by_digest",)

    def __init__(self, teams: tuple[Team, ...]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {
            d: (d, Principal(team, key_id(d))) for team in teams for d in team.key_digests
        }

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        key = presented_key(headers)
        if not key:
            raise invalid_api_key()
        # aiohttp decodes header bytes with surrogateescape: encode them back the same way
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        # the lookup is keyed by a digest the caller cannot steer; the comparison is constant time
        if found is None or not hmac.compare_digest(found[0], digest):
            raise invalid_api_key()
        return found[1]


def presented_key(headers: Mapping[str, str]) -> str:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
        return ""
    return (headers.get("x-api-key") or "").strip()

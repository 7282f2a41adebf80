"""The gateway's settings: one frozen, validated object, built by `gateway.config`.

Secrets are held in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

WINDOWS = ("minute", "hour", "day", "week", "month", "total")
ALL_MODELS: tuple[str, ...] = ("*",)
AUTH_HEADERS = ("x-api-key", "authorization")


class Secret:
    """A string that never shows itself in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class Admin:
    host: str = "127.0.0.1"
    port: int = 9464
    key: Secret | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    default_max_output_tokens: int = 4096
    drain_timeout: float = 30.0
    header_timeout: float = 10.0  # seconds from a request head's first byte to its end
    body_timeout: float = 30.0  # longest pause between chunks of a request body
    max_connections: int = 10000  # open client connections; more wait in the listen backlog
    max_json_depth: int = 64


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 60.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    api_keys: tuple[Secret, ...]
    auth_header: str = "authorization"
    models: tuple[str, ...] = ("*",)
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    per: str
    tokens: int | None = None
    usd: float | None = None

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens is not None else "usd"

    @property
    def limit(self) -> float:
        return float(self.tokens) if self.tokens is not None else float(self.usd or 0.0)


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    key_digests: tuple[bytes, ...]  # SHA-256 digests of the team's client keys
    models: tuple[str, ...] = ("*",)
    budgets: tuple[BudgetRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None  # None: cached input is priced as input


@dataclass(frozen=True, slots=True)
class Cache:
    enabled: bool = True
    ttl: float = 3600.0
    max_bytes: int = 256 * 1024 * 1024
    scope: str = "team"
    max_entry_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class State:
    store: str = "local"
    path: str = "./gateway-state"


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    url: str = ""
    flush_interval: float = 0.5


@dataclass(frozen=True, slots=True)
class Traces:
    endpoint: str = ""
    sample_ratio: float = 1.0
    capture_content: bool = False


@dataclass(frozen=True, slots=True)
class Logs:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Telemetry:
    service_name: str = "llm-gateway"
    traces: Traces = field(default_factory=Traces)
    logs: Logs = field(default_factory=Logs)
    max_model_labels: int = 100


@dataclass(frozen=True, slots=True)
class Settings:
    upstreams: tuple[Upstream, ...]
    teams: tuple[Team, ...]
    listen: Listen = field(default_factory=Listen)
    admin: Admin = field(default_factory=Admin)
    limits: Limits = field(default_factory=Limits)
    prices: Mapping[str, Price] = field(default_factory=dict)
    cache: Cache = field(default_factory=Cache)
    state: State = field(default_factory=State)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    telemetry: Telemetry = field(default_factory=Telemetry)

    def secrets(self) -> tuple[str, ...]:
        """Every upstream key (and the admin key): what must be masked wherever it could echo."""
        out = [k.get() for u in self.upstreams for k in u.api_keys if k.get()]
        if self.admin.key is not None and self.admin.key.get():
            out.append(self.admin.key.get())
        return tuple(out)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()

"""The policy a request runs under: teams, keys, routes, prices, upstream clients and the
maskers built from one set of settings.

A request reads `Gateway.policy` once, at admission, and keeps that snapshot to its end; a
reload swaps in a new one and never changes a request already admitted. Upstream clients
carried over unchanged are shared by both; a replaced client closes when the last request
holding it ends.
"""

from __future__ import annotations

from cachetools import LRUCache

from gateway.auth import Authenticator
from gateway.capture.rule import CaptureRule
from gateway.masking import Secrets
from gateway.prices import PriceBook
from gateway.redact import Redactor
from gateway.routing import GlobSet, Router
from gateway.settings import Settings, Team
from gateway.upstream.client import UpstreamClient


class Policy:
    __slots__ = (
        "_shown",
        "auth",
        "capture",
        "prices",
        "redactor",
        "router",
        "secrets",
        "settings",
        "team_models",
        "teams",
        "upstreams",
    )

    def __init__(
        self, settings: Settings, upstreams: dict[str, UpstreamClient], redactor: Redactor
    ) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.auth = Authenticator(settings.teams)
        self.router = Router(
            ((u.name, u.models) for u in settings.upstreams),
            ((r.models, r.upstreams) for r in settings.routes),
        )
        self.teams: dict[str, Team] = {t.name: t for t in settings.teams}
        self.team_models = {t.name: GlobSet(t.models) for t in settings.teams}
        self.prices = PriceBook(settings.prices)
        self.secrets = Secrets(tuple(s.encode() for s in settings.secrets()))
        self.redactor = redactor
        self.capture = CaptureRule(settings.capture)
        self._shown: LRUCache[str, str] = LRUCache(maxsize=1024)

    def hold(self) -> Policy:
        """Keep this snapshot's upstream pools open for one request: taken in the same step
        as the snapshot is read, so no reload can close a pool between the two."""
        for client in self.upstreams.values():
            client.hold()
        return self

    async def release(self) -> None:
        for client in self.upstreams.values():
            await client.release()

    @property
    def default_upstream(self) -> UpstreamClient:
        """Where a request that names no model goes: the first upstream of the file."""
        return next(iter(self.upstreams.values()))

    def shown(self, text: str) -> str:
        """Client input (a model name) as logs and spans show it: cut to 128 characters, keys
        redacted. Cached: a request's model is nearly always one seen before."""
        cut = text[:128]
        out = self._shown.get(cut)
        if out is None:
            out = self._shown[cut] = self.redactor(cut)
        return out


def next_clients(
    settings: Settings, current: dict[str, UpstreamClient]
) -> tuple[dict[str, UpstreamClient], list[UpstreamClient]]:
    """The clients for new settings: an upstream whose settings did not change keeps its
    client (and pool); the others get a new one. Returns (clients, retired)."""
    fresh: dict[str, UpstreamClient] = {}
    for u in settings.upstreams:
        same = current.get(u.name)
        fresh[u.name] = same if same is not None and same.cfg == u else UpstreamClient(u)
    kept = {id(c) for c in fresh.values()}
    return fresh, [c for c in current.values() if id(c) not in kept]

"""One pooled HTTP client per upstream: header filtering, key injection, timeouts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway import errors
from gateway.auth import CLIENT_CREDENTIAL_HEADERS
from gateway.settings import Upstream

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# never forwarded upstream: hop-by-hop, client credentials, what the gateway sets itself
_DROP_REQUEST = (
    HOP_BY_HOP
    | CLIENT_CREDENTIAL_HEADERS
    | {
        "host",
        "content-length",
        "accept-encoding",
        "cookie",
        "traceparent",
        "tracestate",
        "x-request-id",
        "expect",
        # aiohttp has already decoded a compressed request body: the bytes sent are plain
        "content-encoding",
    }
)
# never forwarded to the client: hop-by-hop, framing the gateway redoes, upstream cookies
_DROP_RESPONSE = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "set-cookie",
    "x-request-id",
    "server",
    "date",
}


def request_headers(
    incoming: Iterable[tuple[str, str]], extra: Mapping[str, str]
) -> CIMultiDict[str]:
    """Client headers minus what must not travel upstream, plus the gateway's own."""
    pairs = list(incoming)
    named = _connection_named(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in pairs:
        lk = k.lower()
        if lk not in _DROP_REQUEST and lk not in named:
            out.add(k, v)
    out["accept-encoding"] = "identity"
    out.update(extra)
    return out


def response_headers(incoming: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """Upstream headers minus hop-by-hop ones (also those named in `Connection`) and any
    `x-gateway-*` an upstream might send: those are the gateway's to set."""
    pairs = list(incoming)
    named = _connection_named(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in pairs:
        lk = k.lower()
        if lk not in _DROP_RESPONSE and lk not in named and not lk.startswith("x-gateway-"):
            out.add(k, v)
    return out


def _connection_named(pairs: list[tuple[str, str]]) -> set[str]:
    return {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",")}


class UpstreamClient:
    """The gateway's connection pool to one upstream. Start once, close at shutdown."""

    def __init__(self, cfg: Upstream) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._session: aiohttp.ClientSession | None = None
        self._keys = itertools.cycle(cfg.api_keys) if cfg.api_keys else None
        url = URL(cfg.base_url)
        self.host = url.host or ""
        self.port = url.port
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=cfg.timeouts.connect, sock_read=None
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            base_url=None,
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def auth_header(self) -> dict[str, str]:
        if self._keys is None:
            return {}
        key = next(self._keys).get()
        if self.cfg.auth_header == "authorization":
            return {"Authorization": f"Bearer {key}"}
        return {"x-api-key": key}

    async def send(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes
    ) -> aiohttp.ClientResponse:
        """Send a request; returns once response headers arrived (or raises GatewayError).

        The error's `reached` says whether the request may have reached the upstream (and so
        may cost money): not when the connection failed, yes when it timed out or broke later.
        """
        session = self._session
        if session is None:
            raise errors.upstream_unavailable(self.name)
        # sent as is: the edge checked the path canonical, and re-quoting could change it
        url = URL(self.cfg.base_url + path_qs, encoded=True)
        try:
            async with asyncio.timeout(self.cfg.timeouts.first_byte):
                return await session.request(
                    method, url, data=body or None, headers=headers, allow_redirects=False
                )
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError):
            raise errors.upstream_unavailable(self.name) from None
        except TimeoutError:
            raise errors.upstream_timeout(self.name, self.cfg.timeouts.first_byte) from None
        except aiohttp.ClientError:
            raise errors.upstream_unavailable(self.name, reached=True) from None

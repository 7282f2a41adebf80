"""One pooled HTTP client per upstream: one attempt per call, the key it is given, timeouts.

A client is shared by every request admitted under a policy that has it. A reload that
replaces it retires it: it closes when the last request holding it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from yarl import URL

from gateway import errors
from gateway.schema import Secret
from gateway.settings import Upstream
from gateway.upstream.health import key_id

URLS_KEPT = 256


class UpstreamClient:
    """The gateway's connection pool to one upstream. Start once, close at shutdown."""

    def __init__(self, cfg: Upstream) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._session: aiohttp.ClientSession | None = None
        self.keys: tuple[Secret | None, ...] = cfg.api_keys or (None,)
        # how a key is shown (12 hex of its SHA-256); "" for an upstream without a key
        self.key_ids = tuple(key_id(k.get()) if k is not None else "" for k in self.keys)
        self._turn = 0  # where the next request starts in the key pool
        self._urls: dict[str, URL] = {}  # by path and query: most requests go to a few
        self.users = 0  # requests holding this client
        self.retired = False  # replaced by a reload: close once no request holds it
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

    @property
    def started(self) -> bool:
        return self._session is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def next_key(self) -> Secret | None:
        """The key the next call uses: the configured keys in turn."""
        return self.keys[self.key_order()[0]]

    def key_order(self) -> range | list[int]:
        """The pool's keys, by index, in the order one request tries them: each request
        starts at the next key, so requests spread over the pool."""
        n = len(self.keys)
        if n == 1:
            return range(1)
        start = self._turn
        self._turn = (start + 1) % n
        return [(start + i) % n for i in range(n)]

    def auth_header(self, key: Secret | None) -> dict[str, str]:
        if key is None:
            return {}
        if self.cfg.auth_header == "authorization":
            return {"Authorization": f"Bearer {key.get()}"}
        return {"x-api-key": key.get()}

    def hold(self) -> None:
        self.users += 1

    async def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            await self.close()

    async def retire(self) -> None:
        """No new request will use this client: close it now, or when the last one ends."""
        self.retired = True
        if self.users == 0:
            await self.close()

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
        url = self._urls.get(path_qs)
        if url is None:
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            # sent as is: the edge checked the path canonical, and re-quoting could change it
            url = self._urls[path_qs] = URL(self.cfg.base_url + path_qs, encoded=True)
        try:
            async with asyncio.timeout(self.cfg.timeouts.first_byte):
                return await session.request(
                    method, url, data=body or None, headers=headers, allow_redirects=False
                )
        except aiohttp.ConnectionTimeoutError:
            err = errors.upstream_unavailable(self.name)
            err.timed_out = True  # a retry condition of its own: `timeout`, not connect_error
            raise err from None
        except aiohttp.ClientConnectorError:
            raise errors.upstream_unavailable(self.name) from None
        except TimeoutError:
            raise errors.upstream_timeout(self.name, self.cfg.timeouts.first_byte) from None
        except aiohttp.ClientError:
            raise errors.upstream_unavailable(self.name, reached=True) from None

    async def websocket(
        self, path: str, headers: Mapping[str, str], max_msg_size: int
    ) -> aiohttp.ClientWebSocketResponse:
        """Open the upstream's own WebSocket at `path` (its Responses WebSocket mode).

        Raises GatewayError: the upstream's refusal of the handshake with its status (a 401
        or 403 names the key as refused), or `upstream_unavailable` when it cannot be reached.
        """
        session = self._session
        if session is None:
            raise errors.upstream_unavailable(self.name)
        url = URL(self.cfg.base_url + path, encoded=True)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(self.cfg.timeouts.first_byte):
                return await session.ws_connect(
                    url,
                    headers=headers,
                    autoping=True,
                    max_msg_size=max_msg_size,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as e:
            err = errors.GatewayError(
                e.status if e.status >= 400 else 502,
                "upstream_error",
                "upstream_refused_websocket",
                f"The upstream {errors.quoted(self.name)} refused the WebSocket handshake"
                f" with HTTP status {e.status}.",
            )
            raise err from None
        except TimeoutError:
            raise errors.upstream_timeout(self.name, self.cfg.timeouts.first_byte) from None
        except aiohttp.ClientError:
            raise errors.upstream_unavailable(self.name) from None

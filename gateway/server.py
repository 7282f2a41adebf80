"""The HTTP server layer under both apps: aiohttp's connection handling, made to keep the
contract where aiohttp answers on its own, and bounded in time and in connections.

- `GatewayRunner` serves an app with `GatewayRequestHandler`: aiohttp's own answers (a
  request its parser refuses, a handler that raised) are OpenAI-shaped JSON with a fixed
  message, never the parser's message, which quotes request bytes (a client's key among them).
- The gateway opens no tunnels: a CONNECT, whatever its target, is answered 405 in JSON without
  reaching the app, and its connection closed with nothing after it read as a request.
- A request head must arrive within `header_timeout` of its first byte; an idle keep-alive
  connection is closed after `KEEPALIVE_IDLE`.
- `read_body` reads a request body with an idle limit between chunks.

aiohttp internals relied on (aiohttp 3.14; re-check on upgrade):
- `AppRunner._make_server` returns a `web_server.Server` whose `__call__` is the protocol
  factory; `Server._loop` and `Server._kwargs` hold what it builds a `RequestHandler` with.
- `RequestHandler.handle_error(request, status, exc, message)` builds every answer aiohttp
  makes itself (parser errors via `_make_error_handler`, 500 and 504 from `_handle_request`).
- `RequestHandler` attributes `_request_count` (one per parsed head, counted in
  `data_received`), `_messages` (parsed heads and their bodies, appended there), `_waiter`,
  `_request_in_progress`, `_close`/`_force_close` and `_lingering_time` (read once per request
  in `start`).
- `start` takes each request off `_messages` with `popleft()` and answers an `_ErrInfo` entry
  through `handle_error` without building a request for the app; bytes after a CONNECT head
  wait in `_message_tail` (the parser stops there, as for an upgrade) until its answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo, _MsgType
from aiohttp.web_server import Server

from gateway import errors, ids
from gateway.errors import GatewayError, error_body

__all__ = [
    "KEEPALIVE_IDLE",
    "BodyTimeout",
    "GatewayRequestHandler",
    "GatewayRunner",
    "http_logger",
    "read_body",
]

# Longer than the idle timeouts of common load balancers (AWS ALB 60 s, GCP 600 s is the
# exception): the balancer, not the gateway, should close an idle pooled connection, or it
# may send a request on a connection the gateway is closing.
KEEPALIVE_IDLE = 75.0

_BAD_REQUEST = "The request is not valid HTTP/1.1."
# Fixed messages by parser exception type, then by what the parser's message starts with
# (llhttp's wording); the parser's own message is never sent, it quotes request bytes.
_BY_TYPE: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "The request method is not valid."),
    (InvalidURLError, "The request target is not valid."),
    (LineTooLong, "The request line or a request header is too long."),
    (InvalidHeader, "A request header is not valid."),
    (TransferEncodingError, "The request body's chunked framing is not valid."),
    (ContentLengthError, "The request body is shorter than its Content-Length."),
    (ContentEncodingError, "The request body's Content-Encoding could not be decoded."),
    (BadStatusLine, "The request line is not valid."),
)
_BY_MESSAGE: tuple[tuple[str, str], ...] = (
    ("too many headers", "The request has too many headers."),
    ("duplicate content-length", "The request has more than one Content-Length."),
    ("present with content-length", "The request has both Transfer-Encoding and Content-Length."),
    ("transfer-encoding", "The request's Transfer-Encoding is not supported."),
    ("content-length", "The request's Content-Length is not valid."),
    ("chunk", "The request body's chunked framing is not valid."),
    ("header", "A request header is not valid."),
    ("url", "The request target is not valid."),
)


def _bad_request_message(exc: BaseException | None) -> str:
    """A fixed description of why the parser refused a request."""
    for kind, text in _BY_TYPE:
        if isinstance(exc, kind):
            return text
    if isinstance(exc, HttpProcessingError):
        # the wording before the first colon; the quoted request bytes come after it
        said = exc.message.split("\n", 1)[0].split(":", 1)[0].lower()
        for words, text in _BY_MESSAGE:
            if words in said:
                return text
    return _BAD_REQUEST


def fresh_ids() -> dict[str, str]:
    """Ids for an answer made before a request exists: one a client can quote, and a trace
    id no other answer has (nothing is traced for it)."""
    return {
        "x-request-id": ids.request_id(),
        "x-gateway-trace-id": f"{random.getrandbits(128):032x}",
    }


class _Connect(HttpProcessingError):
    """A CONNECT request: the gateway is a reverse proxy, it opens no tunnels."""

    code = 405
    message = "CONNECT"


class _Requests(deque[_MsgType]):
    """The queue of parsed requests of a `GatewayRequestHandler`: a CONNECT leaves it as a
    405 error entry, so that none is ever built into a request for the app.

    The C parser makes a CONNECT with an empty target (`CONNECT  \\r\\n`) a message without a
    URL (or with the URL of the connection's previous request): building a request from it
    raises outside aiohttp's error handling, which left the connection open and unanswered."""

    __slots__ = ()

    def popleft(self) -> _MsgType:
        message, payload = super().popleft()
        if not isinstance(message, _ErrInfo) and message.method == hdrs.METH_CONNECT:
            return _ErrInfo(status=405, exc=_Connect(), message=""), EMPTY_PAYLOAD
        return message, payload


def _error_answer(status: int, exc: BaseException | None) -> tuple[str, str, str]:
    """(type, code, message) for an answer aiohttp gives itself."""
    if isinstance(exc, _Connect):
        return (
            "invalid_request_error",
            "method_not_allowed",
            "CONNECT is not supported: the gateway is not a forward proxy.",
        )
    if status == 400:
        return "invalid_request_error", "bad_request", _bad_request_message(exc)
    if status == 504:
        return "server_error", "timeout", "The gateway timed out handling this request."
    if status < 500:
        return "invalid_request_error", "bad_request", _BAD_REQUEST
    return "server_error", "internal_error", "The gateway failed to handle this request."


def _head_timeout_response() -> bytes:
    body = error_body(
        "The request head did not arrive in time.", "invalid_request_error", "request_timeout"
    )
    ids = "".join(f"{k}: {v}\r\n" for k, v in fresh_ids().items()).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n%s\r\n" % (len(body), ids)
    )
    return head + body


class _NoRawRequests(logging.Filter):
    """aiohttp logs a malformed request with the raw bytes it choked on, which can hold a
    client's key: keep the event, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            kind = type(record.exc_info[1]).__name__
            record.msg, record.args = "rejected a malformed HTTP request (%s)", (kind,)
            record.exc_info, record.exc_text = None, None
        return True


def http_logger() -> logging.Logger:
    logger = logging.getLogger("gateway.http")
    if not any(isinstance(f, _NoRawRequests) for f in logger.filters):
        logger.addFilter(_NoRawRequests())
    return logger


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler with JSON error answers, a request-head deadline and no
    CONNECT."""

    __slots__ = ("_body", "_head_due", "_header_timeout", "_on_lost")

    def __init__(self, manager: Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        # loop time by which the head being received must be complete; checked by the
        # server's sweep (a timer per request would cost every request a few microseconds)
        self._head_due: float | None = None
        self._body: StreamReader | None = None  # the body of the last parsed head
        self._on_lost: Callable[[], None] | None = None
        self._messages = _Requests()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when this connection ends (a listener frees its slot)."""
        self._on_lost = callback

    def lost(self) -> None:
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, _Connect):
            # what follows a CONNECT head would be the tunnel's bytes: none of them is read
            # as a request, and the connection ends with this answer
            self._message_tail = b""
            self.close()
            self.logger.debug("refused a CONNECT request from %s", request.remote)
        else:
            # aiohttp's version logs (through the logger's _NoRawRequests filter) and raises if
            # a response is already under way; only its text/plain answer is replaced
            super().handle_error(request, status, exc, None)
        type_, code, text = _error_answer(status, exc)
        resp = web.Response(
            status=status,
            body=error_body(text, type_, code),
            content_type="application/json",
            headers=fresh_ids(),
        )
        resp.force_close()
        return resp

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close or self._upgraded:
            super().data_received(data)
            return
        if data and self._head_due is None and (self._body is None or self._body.is_eof()):
            # the first byte of a head: bytes while the last body is incomplete are body bytes;
            # a chunk that ends one body and starts a head arms the deadline on the next chunk
            self._head_due = self._loop.time() + self._header_timeout
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._body = self._messages[-1][1] if self._messages else None
            self._head_due = None

    def check_head(self, now: float) -> None:
        """Called by the server's sweep: past the deadline, the head is late."""
        due = self._head_due
        if due is not None and now >= due:
            self._head_due = None
            self._head_late()

    def _head_late(self) -> None:
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress or self._messages:
            self.close()  # a late pipelined head: answer what came before it, then close
            return
        self.transport.write(_head_timeout_response())
        self.force_close()  # the transport sends what it holds before closing

    def end_after_response(self) -> None:
        """Close once the current response is sent, without lingering to read a body the
        client stopped sending (aiohttp would wait `lingering_time` for it)."""
        self._lingering_time = 0.0
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_due = None
        try:
            super().connection_lost(exc)
        finally:
            self.lost()


class _Server(Server):
    """Builds `GatewayRequestHandler`s, and sweeps them for late request heads while it has
    connections (a few times per `header_timeout`, at most every second)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sweep: asyncio.TimerHandle | None = None
        timeout = float(self._kwargs.get("header_timeout", 10.0))
        self._every = min(1.0, max(0.05, timeout / 4))

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._every, self._check_heads)

    def _check_heads(self) -> None:
        self._sweep = None
        now = self._loop.time()
        for handler in list(self._connections):
            if isinstance(handler, GatewayRequestHandler):
                handler.check_head(now)
        if self._connections:
            self._sweep = self._loop.call_later(self._every, self._check_heads)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are `GatewayRequestHandler`s with the given head deadline."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        keepalive_timeout: float = KEEPALIVE_IDLE,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            app, header_timeout=header_timeout, keepalive_timeout=keepalive_timeout, **kwargs
        )

    async def _make_server(self) -> Server:
        # Application._make_handler builds a plain Server (and runs the app's startup first):
        # rebuild it with the same handler, factory and keyword arguments
        base = await super()._make_server()
        return _Server(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )


class BodyTimeout(GatewayError):
    """The client paused longer than the idle limit while sending its request body."""

    def __init__(self, idle: float) -> None:
        super().__init__(
            408,
            "invalid_request_error",
            "request_timeout",
            f"The request body stalled: nothing arrived for {idle:g} s.",
            headers={"connection": "close"},
        )


async def read_body(request: web.BaseRequest, limit: int, idle: float) -> bytes:
    """The whole request body, at most `limit` bytes, with at most `idle` seconds between
    chunks. Raises `BodyTimeout` (408; the connection closes after the answer),
    `errors.request_too_large` (413) or `errors.invalid_json` (400: broken chunking or
    Content-Encoding). A client that disconnects raises the ConnectionError aiohttp sets."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.request_too_large(limit)
    content = request.content
    try:
        # the whole body came with the head (most requests): no waiting, so no timer; not for
        # an encoded body, which `read()` would decompress whole before its size is checked
        if content.is_eof() and hdrs.CONTENT_ENCODING not in request.headers:
            whole = await content.read()
            if len(whole) > limit:
                raise errors.request_too_large(limit)
            return whole
    except (web.RequestPayloadError, HttpProcessingError):
        raise errors.invalid_json("the body could not be read") from None
    # as request.read() does: compressed bodies decompress in large chunks, not small
    # pause/resume cycles; reading never pauses below the limit, so only the client's pace counts
    content.set_read_chunk_size(limit)
    body = bytearray()
    try:
        while True:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise errors.request_too_large(limit)
    except TimeoutError:
        protocol = request.protocol
        if isinstance(protocol, GatewayRequestHandler):
            protocol.end_after_response()
        else:
            protocol.close()
        raise BodyTimeout(idle) from None
    except (web.RequestPayloadError, HttpProcessingError):
        raise errors.invalid_json("the body could not be read") from None

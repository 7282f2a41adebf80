"""The HTTP server layer on real sockets: aiohttp's own error answers are OpenAI-shaped JSON
that echo no request bytes, and a client cannot hold connections open by sending slowly or
by opening many (gateway.server)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web
from conftest import ALPHA_KEY, GatewayFactory, Running, Upstream, bound_socket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.listener import LimitedSite
from gateway.server import KEEPALIVE_IDLE, GatewayRunner, read_body

SECRET = "sk-client-secret-5f1e9a"  # not a valid key: valid requests stop at 401
MARKER = "mk-echo-31337"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def parse(raw: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), body


def assert_json_error(raw: bytes, status: int, code: str) -> dict[str, object]:
    got, head, body = parse(raw)
    assert got == status, raw[:300]
    assert b"content-type: application/json" in head, head
    err = orjson.loads(body)["error"]
    assert err["type"] in ("invalid_request_error", "server_error") and err["param"] is None
    assert err["code"] == code and isinstance(err["message"], str), err
    return dict(err)


async def exchange(port: int, data: bytes, within: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, read until the server closes: (what came back, closed `within` seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        writer.write(data)
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                got += chunk
        return got, True
    except TimeoutError:
        return got, False
    except ConnectionResetError:  # closed with request bytes unread: the answer came first
        return got, True
    finally:
        writer.close()


async def _drain(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.01)
    except TimeoutError:
        return b""


async def inflight(gw: Running) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin_url}/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("gateway_inflight_requests "))
    return float(line.split()[1])


def head(method: bytes, target: bytes, *headers: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: x"]
    lines += [b"Authorization: Bearer " + SECRET.encode(), b"X-Trace-Note: " + MARKER.encode()]
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n"


MALFORMED = {
    "bad method": head(b"G@T", b"/v1/models"),
    "tls on http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode() + b"\r\n\r\n",
    "asterisk target": head(b"GET", b"*"),
    "nul in target": head(b"GET", b"/v1/\x00" + MARKER.encode()),
    "target too long": head(b"GET", b"/v1/" + MARKER.encode() * 700),
    "header too long": head(b"GET", b"/v1/models", b"X-Big: " + MARKER.encode() * 700),
    "too many headers": head(b"GET", b"/v1/models", *(b"X-%d: 1" % i for i in range(200))),
    "duplicate content-length": head(
        b"POST", b"/v1/responses", b"Content-Length: 2", b"Content-Length: 3"
    )
    + b"{}",
    "duplicate transfer-encoding": head(
        b"POST", b"/v1/responses", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"
    )
    + b"0\r\n\r\n",
    "content-length and chunked": head(
        b"POST", b"/v1/responses", b"Content-Length: 5", b"Transfer-Encoding: chunked"
    )
    + b"0\r\n\r\n",
    "unknown transfer-encoding": head(b"POST", b"/v1/responses", b"Transfer-Encoding: gzip"),
    "bad chunk size": head(b"POST", b"/v1/responses", b"Transfer-Encoding: chunked")
    + b"zz\r\n{}\r\n0\r\n\r\n",
    "bad content-length": head(b"POST", b"/v1/responses", b"Content-Length: -1"),
    "control byte in header": head(b"GET", b"/v1/models", b"X-A: " + MARKER.encode() + b"\x01"),
    "space before colon": head(b"GET", b"/v1/models", b"X-A : " + MARKER.encode()),
    "obsolete line folding": head(b"GET", b"/v1/models", b" " + MARKER.encode()),
    "bad version": head(b"GET", b"/v1/models").replace(b"HTTP/1.1", b"HTTP/9.9", 1),
    "bare LF": head(b"GET", b"/v1/models").replace(b"\r\n", b"\n"),
    "empty target": head(b"GET", b""),
    "empty target, HTTP/1.0": head(b"GET", b"").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    "empty target, no version": head(b"POST", b"").replace(b" HTTP/1.1", b"", 1),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
async def test_malformed_request_gets_json_without_request_bytes(
    gateway: Running, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own 400 for each kind of malformed request is an OpenAI-shaped JSON error
    with a fixed message, echoes neither the client's Authorization value nor any other request
    bytes, and closes the connection; the log line about it holds none of them either."""
    caplog.set_level(logging.DEBUG)
    raw, closed = await exchange(port_of(gateway.url), MALFORMED[kind])
    assert closed, raw[:300]
    err = assert_json_error(raw, 400, "bad_request")
    assert err["type"] == "invalid_request_error"
    assert SECRET.encode() not in raw and MARKER.encode() not in raw, raw
    assert SECRET not in caplog.text and MARKER not in caplog.text


async def test_admin_listener_answers_malformed_requests_in_json(gateway: Running) -> None:
    """The admin listener is built by the same runner: its parser errors are JSON too."""
    raw, closed = await exchange(port_of(gateway.admin_url), MALFORMED["control byte in header"])
    assert closed
    assert_json_error(raw, 400, "bad_request")
    assert SECRET.encode() not in raw and MARKER.encode() not in raw


async def test_handler_crash_and_timeout_are_json() -> None:
    """An exception that escapes a handler gets aiohttp's 500, and a TimeoutError its 504:
    both are JSON through GatewayRunner, and say nothing of the exception."""

    async def crash(request: web.Request) -> web.Response:
        if request.path == "/timeout":
            raise TimeoutError(MARKER)
        raise RuntimeError(MARKER)

    app = web.Application()
    app.router.add_get("/{tail:.*}", crash)
    runner = GatewayRunner(app, header_timeout=5, access_log=None)
    await runner.setup()
    try:
        sock = bound_socket()
        await web.SockSite(runner, sock).start()
        for path, status, code in ((b"/x", 500, "internal_error"), (b"/timeout", 504, "timeout")):
            raw, closed = await exchange(sock.getsockname()[1], head(b"GET", path))
            assert closed
            err = assert_json_error(raw, status, code)
            assert err["type"] == "server_error" and MARKER not in str(err)
    finally:
        await runner.cleanup()


METHODS = st.sampled_from(
    [b"GET", b"POST", b"DELETE", b"OPTIONS", b"CONNECT", b"get", b"G@T", b"", b"PO ST"]
) | st.binary(max_size=6).filter(lambda b: b"\r" not in b and b"\n" not in b)
TARGETS = st.sampled_from(
    [
        b"/v1/models",
        b"/v1/responses",
        b"/v1/" + MARKER.encode(),
        b"/healthz",
        b"*",
        b"http://example.com/v1/models",
        b"//v1/models",
        b"/v1/%zz",
        b"/v1/\x00",
        b"/v1/" + b"a" * 9000,
        b"",
    ]
) | st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1", b""])
NAMES = st.sampled_from(
    [b"X-A", b"Accept", b"Content-Type", b"X A", b"X-\x7f", b"", b"Content-Length", b"Expect"]
)
VALUES = st.sampled_from(
    [b"", b"1", b"chunked", b"gzip", b"2", b"-1", b"2, 2", b"\x01", b"\xff\xfe", b"a" * 9000]
) | st.binary(max_size=16).filter(lambda b: b"\r" not in b and b"\n" not in b)
FRAMING = st.sampled_from(
    [
        [],
        [b"Content-Length: 2"],
        [b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 2"],
        [b"Content-Length: 2", b"Content-Length: 2"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
    ]
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS)
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
    sep = draw(st.sampled_from([b": ", b":", b" : ", b":\t", b"\t: "]))
    extra = draw(st.lists(st.tuples(NAMES, VALUES), max_size=4))
    fields = [b"Host: x", b"Authorization: Bearer " + SECRET.encode(), *draw(FRAMING)]
    fields += [name + sep + value for name, value in extra]
    fields += [b"X-Trace-Note" + sep + MARKER.encode(), b"Connection: close"]
    body = draw(st.sampled_from([b"{}", b"2\r\n{}\r\n0\r\n\r\n", b"zz\r\n", b""]))
    return eol.join([line, *fields]) + eol + eol + body


# Longer than aiohttp's lingering_time (10 s): a request answered before its declared body
# came (e.g. a 401 for `Content-Length: 2` and no body) is closed only after the server has
# waited that long for the body, to let a slow client read the answer before the close.
CLOSED_WITHIN = 15.0


def blocking_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSED_WITHIN) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before reading all
            s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


async def test_fuzzed_request_heads_never_get_text_or_echoes(
    gateway_factory: GatewayFactory,
) -> None:
    """Request lines and header forms drawn at random (methods, targets, versions, line ends,
    separators, framing headers, bytes): whatever the gateway answers is JSON, an error is
    OpenAI-shaped, the answer ends with the connection closed, and it holds neither the
    Authorization value nor the other request bytes marked in it."""
    gw = await gateway_factory(header_timeout=1)
    port = port_of(gw.url)

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=requests())
    # CONNECT with an empty target: aiohttp's C parser makes it a request without a URL
    @example(data=b"CONNECT  \r\nHost: x\r\nConnection: close\r\n\r\n")
    @example(data=b"CONNECT \r\nHost: x\r\n\r\n")
    @example(
        data=b"CONNECT  \r\nHost: x\r\nAuthorization: Bearer %s\r\nX-Trace-Note: %s\r\n"
        b"Connection: close\r\n\r\n{}" % (SECRET.encode(), MARKER.encode())
    )
    def check(data: bytes) -> None:
        raw = blocking_exchange(port, data)
        assert SECRET.encode() not in raw and MARKER.encode() not in raw, (data, raw)
        if not raw:
            return  # closed without an answer (e.g. a head the server gave up on)
        status, head_, body = parse(raw)
        assert b"content-type: application/json" in head_, (data, raw[:300])
        payload = orjson.loads(body)
        if status >= 400:
            err = payload["error"]
            assert set(err) == {"message", "type", "param", "code"}, (data, raw)
            assert err["param"] is None and isinstance(err["code"], str), (data, raw)

    await asyncio.to_thread(check)


def answers(raw: bytes) -> list[tuple[int, bytes, bytes]]:
    """The responses in `raw`, in order, as (status, lowercased head, body)."""
    out = []
    while raw:
        head_, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw
        length = int(head_.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append((int(head_.split(b" ", 2)[1]), head_.lower(), rest[:length]))
        raw = rest[length:]
    return out


# CONNECT in every form the parser takes, each followed by bytes that would be a request
NEXT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
CONNECTS = {
    "empty target": b"CONNECT  \r\nHost: x\r\nConnection: close\r\n\r\n",
    "empty target, keep-alive": b"CONNECT \r\nHost: x\r\n\r\n" + NEXT,
    "empty target, HTTP/1.0": b"CONNECT  HTTP/1.0\r\n\r\n" + NEXT,
    "no version": b"CONNECT x\r\nHost: x\r\n\r\n" + NEXT,
    "authority": b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
    "origin-form target": b"CONNECT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" + NEXT,
    "with a body": b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" + NEXT,
}
# what comes before it on the same connection, and how many answers that gets
BEFORE = {
    "first": (b"", 0),
    "after a request": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 1),
    "after a declined upgrade": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        1,
    ),
    "after a request with a body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALPHA_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 70\r\n\r\n"
        + b'{"model":"nusantara-base","messages":[{"role":"user","content":"hi"}]}',
        1,
    ),
}


def assert_connect_refused(answer: tuple[int, bytes, bytes], what: str) -> None:
    status, head_, body = answer
    assert status == 405, (what, head_, body)
    assert b"content-type: application/json" in head_ and b"x-request-id: req_" in head_, what
    err = orjson.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "method_not_allowed", what
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None, what


@pytest.mark.parametrize("before", list(BEFORE))
@pytest.mark.parametrize("kind", list(CONNECTS))
async def test_connect_is_answered_405_in_json_and_closed(
    gateway_factory: GatewayFactory, upstream: Upstream, kind: str, before: str
) -> None:
    """The gateway opens no tunnels: a CONNECT, whatever its target and version and whatever
    came before it on the connection, is answered 405 `method_not_allowed` in JSON at once and
    its connection closed; what follows it is never read as a request, and no CONNECT reaches
    the app or the upstream. (An empty target used to leave the connection open for good.)"""
    gw = await gateway_factory(header_timeout=1)
    prefix, served = BEFORE[before]
    started = time.monotonic()
    raw, closed = await exchange(port_of(gw.url), prefix + CONNECTS[kind], within=2)
    assert closed and time.monotonic() - started < 2, raw
    got = answers(raw)
    assert len(got) == served + 1, raw
    assert all(status != 405 for status, _, _ in got[:served]), raw
    assert_connect_refused(got[-1], kind)
    assert not any(call.startswith("CONNECT") for call in upstream.state.calls)


@pytest.mark.parametrize("kind", list(CONNECTS))
async def test_no_connect_reaches_the_app_or_keeps_a_connection_slot(kind: str) -> None:
    """On a GatewayRunner with max_connections 1: a CONNECT is answered 405 and its
    connection closed within header_timeout + 1 s, so the one slot is free for the next
    client; the app's handler sees only the request that is not CONNECT."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = GatewayRunner(app, header_timeout=0.5, access_log=None)
    await runner.setup()
    try:
        sock = bound_socket()
        await LimitedSite(runner, sock=sock, max_connections=1).start()
        port = sock.getsockname()[1]
        raw, closed = await exchange(port, CONNECTS[kind], within=1.5)
        assert closed, raw
        (answer,) = answers(raw)
        assert_connect_refused(answer, kind)
        last = NEXT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        raw, closed = await exchange(port, last, within=1.5)  # the slot is free
        assert closed and [a[0] for a in answers(raw)] == [200], raw
        assert seen == ["GET /healthz"]
    finally:
        await runner.cleanup()


async def test_declined_upgrade_is_answered_by_the_app_and_the_connection_kept() -> None:
    """`Upgrade: websocket` on a path that is no WebSocket endpoint is an ordinary request to
    the app (aiohttp declines the upgrade when the handler answers normally), and the requests
    after it on the connection are served."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = GatewayRunner(app, header_timeout=0.5, access_log=None)
    await runner.setup()
    try:
        sock = bound_socket()
        await LimitedSite(runner, sock=sock, max_connections=1).start()
        upgrade = b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        last = b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        raw, closed = await exchange(sock.getsockname()[1], upgrade + last, within=1.5)
        assert closed and [a[0] for a in answers(raw)] == [200, 200], raw
        assert seen == ["GET /a", "GET /b"]
    finally:
        await runner.cleanup()


async def test_slowloris_head_is_closed_after_header_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    """A client trickling its request head byte by byte is answered 408 and disconnected
    `header_timeout` after the head's first byte, long before it would finish."""
    gw = await gateway_factory(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    data = head(b"GET", b"/healthz", b"X-Pad: " + b"p" * 200)
    started = time.monotonic()
    got = b""
    try:
        for i in range(len(data)):  # 0.05 s a byte: the whole head would take > 10 s
            try:
                writer.write(data[i : i + 1])
                await writer.drain()
            except ConnectionError:
                break
            got += await _drain(reader)
            if reader.at_eof() or time.monotonic() - started > 5:
                break
            await asyncio.sleep(0.05)
        got += await asyncio.wait_for(reader.read(), 1)
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert reader.at_eof(), "the slow head was not cut"
    assert 0.4 < elapsed < 2.0, elapsed
    assert_json_error(got, 408, "request_timeout")


async def test_header_timeout_does_not_cut_idle_keepalive_or_a_timely_head(
    gateway_factory: GatewayFactory,
) -> None:
    """The deadline runs from a head's first byte: a keep-alive connection idle between
    requests for longer than header_timeout is still served, and so is a head sent in pieces
    that ends in time. Idle keep-alive connections are governed by KEEPALIVE_IDLE."""
    gw = await gateway_factory(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2):
            writer.write(request[:10])
            await asyncio.sleep(0.2)
            writer.write(request[10:])
            status_line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            length = int(status_line.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.8)  # idle longer than header_timeout
        assert not reader.at_eof()
        handlers = gw.runner.server.connections if gw.runner.server else []
        assert handlers and all(h.keepalive_timeout == KEEPALIVE_IDLE for h in handlers)
    finally:
        writer.close()


async def test_silent_connection_is_closed_by_the_idle_timeout() -> None:
    """A connection that never sends a byte has no head deadline: the runner's idle
    keep-alive timeout closes it."""
    app = web.Application()
    runner = GatewayRunner(app, header_timeout=5, keepalive_timeout=0.3, access_log=None)
    await runner.setup()
    try:
        sock = bound_socket()
        await LimitedSite(runner, sock=sock, max_connections=10).start()
        started = time.monotonic()
        raw, closed = await exchange(sock.getsockname()[1], b"", within=3)
        assert closed and raw == b"" and time.monotonic() - started < 2
    finally:
        await runner.cleanup()


@pytest.fixture
async def body_server() -> AsyncIterator[tuple[int, dict[str, int]]]:
    """A one-route app on GatewayRunner whose handler reads with read_body(limit 64, idle 0.5)
    and counts the requests it is handling."""
    state = {"inflight": 0}

    async def upload(request: web.Request) -> web.Response:
        state["inflight"] += 1
        try:
            body = await read_body(request, 64, 0.5)
        except GatewayError as e:
            return e.response()
        finally:
            state["inflight"] -= 1
        return web.json_response({"bytes": len(body)})

    app = web.Application()
    app.router.add_post("/upload", upload)
    runner = GatewayRunner(app, header_timeout=5, access_log=None)
    await runner.setup()
    sock = bound_socket()
    await LimitedSite(runner, sock=sock, max_connections=100).start()
    yield sock.getsockname()[1], state
    await runner.cleanup()


CHUNKED = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_stalled_chunked_upload_gets_408_and_is_closed(
    body_server: tuple[int, dict[str, int]],
) -> None:
    """An upload that stops sending chunks is answered 408 `request_timeout` about
    body_timeout after its last chunk, the connection is closed at once (no lingering read of
    a body that will not come) and the handler is no longer running."""
    port, state = body_server
    started = time.monotonic()
    raw, closed = await exchange(port, CHUNKED + b"2\r\n{}\r\n", within=3)
    assert closed and time.monotonic() - started < 1.5, (raw, time.monotonic() - started)
    assert_json_error(raw, 408, "request_timeout")
    assert state["inflight"] == 0


async def test_read_body_keeps_size_and_encoding_errors(
    body_server: tuple[int, dict[str, int]],
) -> None:
    """read_body answers like request.read() did: whole bodies arrive, a body over the limit
    (declared or streamed) is 413, a body that cannot be decoded is 400 invalid_json."""
    port, _ = body_server
    ok = CHUNKED.replace(b"chunked", b"chunked\r\nConnection: close") + b"2\r\n{}\r\n0\r\n\r\n"
    raw, _ = await exchange(port, ok)
    assert parse(raw)[0] == 200 and orjson.loads(parse(raw)[2]) == {"bytes": 2}
    declared = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n" + b"a" * 65
    declared = declared.replace(b"Host: x", b"Host: x\r\nConnection: close")
    assert_json_error((await exchange(port, declared))[0], 413, "request_too_large")
    streamed = (
        CHUNKED.replace(b"Host: x", b"Host: x\r\nConnection: close")
        + b"40\r\n"
        + b"a" * 64
        + b"\r\n1\r\na\r\n0\r\n\r\n"
    )
    assert_json_error((await exchange(port, streamed))[0], 413, "request_too_large")
    zipped = gzip.compress(b"{}")[:-4] + b"!!!!"
    bad = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(zipped) + zipped
    )
    assert_json_error((await exchange(port, bad))[0], 400, "invalid_json")


async def test_stalled_upload_to_the_gateway_is_not_left_in_flight(
    gateway_factory: GatewayFactory,
) -> None:
    """Through the gateway: a stalled chunked POST /v1/responses is answered 408 after
    body_timeout, closed, and no longer counted in gateway_inflight_requests."""
    gw = await gateway_factory(body_timeout=0.5)
    data = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALPHA_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b'2\r\n{"\r\n'
    )
    raw, closed = await exchange(port_of(gw.url), data, within=3)
    assert closed, raw
    assert_json_error(raw, 408, "request_timeout")
    assert await inflight(gw) == 0


async def open_served(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has had one request answered: accepted and still open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 2)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return reader, writer


async def test_connection_over_max_connections_waits_until_one_closes(
    gateway_factory: GatewayFactory,
) -> None:
    """With max_connections: 3, a fourth connection is not served while three are open (it
    waits in the listen backlog), and is served as soon as one of them closes."""
    gw = await gateway_factory(max_connections=3)
    port = port_of(gw.url)
    opened = [await open_served(port) for _ in range(3)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the kernel's backlog
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = asyncio.ensure_future(reader.read())
        done, _ = await asyncio.wait({answer}, timeout=0.5)
        assert not done, "served over the limit"
        opened[0][1].close()
        raw = await asyncio.wait_for(answer, 2)
        assert raw.startswith(b"HTTP/1.1 200"), raw
        writer.close()
    finally:
        for _, w in opened:
            w.close()


async def test_normal_requests_work_after_a_burst_of_half_open_connections(
    gateway_factory: GatewayFactory,
) -> None:
    """50 connections each send half a request head and stall; with max_connections: 10 and
    header_timeout: 0.5 they are all answered 408 and closed within a few header timeouts, and
    a normal request queued behind them is served, with no connection left open."""
    gw = await gateway_factory(max_connections=10, header_timeout=0.5)
    port = port_of(gw.url)
    stalled = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        stalled.append((reader, writer))
    try:
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.get(f"{gw.url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
            assert time.monotonic() - started < 6
        answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in stalled)), 6)
        for raw in answers:
            assert_json_error(raw, 408, "request_timeout")
    finally:
        for _, w in stalled:
            w.close()
    server = gw.runner.server
    assert server is not None
    for _ in range(100):
        if not server.connections:
            break
        await asyncio.sleep(0.02)
    assert server.connections == []


async def _limited_site_round(host: str | None, sock: socket.socket | None) -> int:
    """Serve one app on a LimitedSite with max_connections 1 on the running loop, check the
    limit and that stopping the runner closes the listener; returns the port it used."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/", ok)
    runner = GatewayRunner(app, header_timeout=5, access_log=None)
    await runner.setup()
    site = LimitedSite(runner, host, 0, sock=sock, max_connections=1, reuse_port=sock is None)
    await site.start()
    port = site.port
    first = await asyncio.open_connection("127.0.0.1", port)
    first[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(first[0].readuntil(b"}"), 2)).startswith(b"HTTP/1.1 200")
    second = await asyncio.open_connection("127.0.0.1", port)
    second[1].write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = asyncio.ensure_future(second[0].read())
    done, _ = await asyncio.wait({answer}, timeout=0.3)
    assert not done, "served over the limit"
    first[1].close()
    assert (await asyncio.wait_for(answer, 2)).startswith(b"HTTP/1.1 200")
    second[1].close()
    await runner.cleanup()
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
    return port


async def test_limited_site_from_host_port_and_stop_closes_listener() -> None:
    """LimitedSite binds host/port itself (with reuse_port) or takes a bound socket, enforces
    its limit, and a runner cleanup closes the listening socket and its accept loop."""
    await _limited_site_round("127.0.0.1", None)
    sock = bound_socket()
    await _limited_site_round(None, sock)
    assert sock.fileno() == -1


def test_limited_site_under_uvloop() -> None:
    """The accept loop uses only loop.sock_accept and loop.connect_accepted_socket: it works
    the same on uvloop, which the gateway uses in production."""
    uvloop.run(_limited_site_round("127.0.0.1", None))

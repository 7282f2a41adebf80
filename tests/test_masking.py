"""Masking echoed upstream keys: the pure masker (headers, JSON bodies, SSE streams split any
way), then end to end through a gateway in front of upstreams that echo the key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import ADMIN_KEY, UPSTREAM_KEY, GatewayFactory, auth, start_app
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.masking import (
    Secrets,
    StreamMasker,
    mask,
    mask_body,
    mask_headers,
    mask_secrets,
)
from gateway.sse import SSEDecoder
from gateway.sse_masking import SSEMasker

KEY = UPSTREAM_KEY
SECRETS = (KEY.encode(), ADMIN_KEY.encode())
MASKED = "sk-****"


def escaped(
    text: str, escape: Callable[[int], bool] = lambda i: True, upper: bool = False
) -> bytes:
    """A JSON string literal with the characters at positions `escape` picks as `\\uXXXX`."""
    hexes = "\\u{:04X}" if upper else "\\u{:04x}"
    chars = [
        hexes.format(ord(c)) if escape(i) or c in '"\\' or ord(c) < 0x20 else c
        for i, c in enumerate(text)
    ]
    return b'"' + "".join(chars).encode() + b'"'


def resp_delta(literal: bytes, seq: int = 1, nl: bytes = b"\n") -> bytes:
    return (
        b"event: response.output_text.delta"
        + nl
        + b'data: {"type":"response.output_text.delta","sequence_number":'
        + str(seq).encode()
        + b',"item_id":"msg_1","output_index":0,"content_index":0,"delta":'
        + literal
        + b',"logprobs":[]}'
        + nl
        + nl
    )


def chat_delta(literal: bytes, nl: bytes = b"\n") -> bytes:
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m",'
        b'"choices":[{"index":0,"delta":{"content":'
        + literal
        + b'},"logprobs":null,"finish_reason":null}]}'
        + nl
        + nl
    )


def chat_tool_delta(literal: bytes) -> bytes:
    return (
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":'
        b'[{"index":0,"function":{"arguments":' + literal + b'}}]},"finish_reason":null}]}\n\n'
    )


CHAT_FINISH = (
    b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}]}\n\n'
)
CHAT_DONE = CHAT_FINISH + b"data: [DONE]\n\n"
RESP_DONE = (
    b'event: response.output_text.done\ndata: {"type":"response.output_text.done",'
    b'"sequence_number":90,"item_id":"msg_1","output_index":0,"content_index":0,"text":"t"}\n\n'
)


def texts(raw: bytes) -> str:
    """What a client concatenates: Responses `delta`s, Chat contents and tool arguments."""
    out = []
    for event in SSEDecoder().feed(raw + b"\n\n"):
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("delta"), str):
            out.append(obj["delta"])
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                out.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                out.append(call["function"]["arguments"])
    return "".join(out)


def through(chunks: list[bytes], secrets: tuple[bytes, ...] = SECRETS) -> bytes:
    masker = SSEMasker(secrets)
    return b"".join([masker.feed(c) for c in chunks] + [masker.flush()])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    ps = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *ps], [*ps, len(data)], strict=True)]


# ---------------------------------------------------------------- the pure masker


def test_mask_keeps_three_characters_of_a_long_key_only() -> None:
    assert mask(KEY.encode()) == b"sk-****"
    assert mask(b"short-key-12") == b"****"
    assert mask_secrets(f"x {KEY} y".encode(), SECRETS) == b"x sk-**** y"
    # the core alone (the key without its well-known `sk-`) is masked too
    assert mask_secrets(KEY[3:].encode(), SECRETS) == b"****"


def test_mask_body_sees_json_escapes() -> None:
    every_lower = escaped(KEY)
    every_upper = escaped(KEY, upper=True)
    one = escaped(KEY, lambda i: KEY[i] == "-")  # sk\u002dupstream\u002d...
    for literal in (every_lower, every_upper, one):
        body = b'{"error":{"message":' + literal + b',"code":"invalid_api_key"}}'
        out = mask_body(body, SECRETS)
        assert orjson.loads(out)["error"]["message"] == MASKED
        assert orjson.loads(out)["error"]["code"] == "invalid_api_key"
    # `\/` only matters when a key holds a slash
    slashed = b"sk-ab/cdefgh/ijklmnop"
    body = b'{"m":"key sk-ab\\/cdefgh\\/ijklmnop!"}'
    assert orjson.loads(mask_body(body, (slashed,)))["m"] == "key sk-****!"


def test_mask_body_leaves_clean_bodies_alone() -> None:
    body = b'{"text":"line\\nbreak \\u00e9t\\u00e9 \\"quoted\\"","n":1}'
    assert mask_body(body, SECRETS) is body  # escapes of no key's character: not decoded
    spaced = orjson.dumps({"a": f"x{KEY}"}, option=orjson.OPT_INDENT_2)
    assert orjson.loads(mask_body(spaced, SECRETS)) == {"a": "x" + MASKED}


def test_mask_headers_values_and_names() -> None:
    headers = {
        "x-debug-auth": f"Bearer {KEY}",
        "x-json": '{"k":"' + escaped(KEY, lambda i: i % 2 == 0).decode()[1:-1] + '"}',
        "x-url": "https://u/?k=" + "".join(f"%{ord(c):02X}" for c in KEY),
        f"x-{KEY}": "1",
        "content-type": "application/json",
    }
    out = mask_headers(headers, SECRETS)
    assert out["x-debug-auth"] == f"Bearer {MASKED}"
    assert orjson.loads(out["x-json"].encode()) == {"k": MASKED}
    assert out["x-url"] == f"https://u/?k={MASKED}"
    assert out[f"x-{MASKED}"] == "1"
    assert out["content-type"] == "application/json"
    assert not any(KEY in k or KEY in v for k, v in out.items())


def test_raw_stream_masker_split_across_chunks() -> None:
    body = f"audio... {KEY} ...".encode()
    for i in range(len(body) + 1):
        masker = StreamMasker(SECRETS)
        out = masker.feed(body[:i]) + masker.feed(body[i:]) + masker.flush()
        assert out == b"audio... sk-**** ...", i


def test_split_key_event_is_held_only_until_the_channel_answers() -> None:
    masker = SSEMasker(SECRETS)
    first = resp_delta(b'"my key is sk-upstream-sec"', 1)
    assert masker.feed(first) == b""  # could be the key's start: held
    rest = resp_delta(b'"ret-0123456789abcdef, bye"', 2)
    out = masker.feed(rest)
    assert texts(out) == f"my key is {MASKED}, bye"
    assert KEY.encode() not in out
    # not the key after all: both events go out unchanged once the next delta shows it
    masker = SSEMasker(SECRETS)
    assert masker.feed(first) == b""
    other = resp_delta(b'"ret? no."', 2)
    assert masker.feed(other) == first + other
    # ...or once the channel ends
    masker = SSEMasker(SECRETS)
    assert masker.feed(first) == b""
    assert masker.feed(RESP_DONE) == first + RESP_DONE
    # ...or at the end of the stream
    masker = SSEMasker(SECRETS)
    assert masker.feed(first) == b""
    assert masker.flush() == first


def test_short_starts_are_not_held_but_remembered() -> None:
    """A delta ending with `sk` (no more than the mask shows) goes out at once; a key that it
    starts is still masked from the following deltas, one character or many at a time."""
    masker = SSEMasker(SECRETS)
    a = resp_delta(b'"one sk"', 1)
    assert masker.feed(a) == a
    pieces = ["-", "u", "pstream-sec", "ret-0123456789", "abcdef", " end"]
    for i, piece in enumerate(pieces):
        a += masker.feed(resp_delta(orjson.dumps(piece), 2 + i))
    out = a
    out += masker.flush()
    assert texts(out) == f"one {MASKED} end"


def test_chat_content_and_tool_arguments_split() -> None:
    for make in (chat_delta, chat_tool_delta):
        stream = (
            make(b'"{\\"key\\": \\"sk-ups"')
            + make(b'"tream-secret-0123"')
            + make(b'"456789abcdef\\"}"')
            + CHAT_DONE
        )
        out = through([stream])
        assert texts(out) == '{"key": "' + MASKED + '"}'
        assert KEY.encode() not in out


def test_crlf_comments_done_and_non_json_data_pass_through() -> None:
    stream = (
        b": keep-alive\r\n\r\n"
        + resp_delta(b'"sk-upstream"', 1, b"\r\n")
        + b"data: not json at all\r\n\r\n"
        + resp_delta(b'"-secret-0123456789abcdef"', 2, b"\r\n")
        + b"data: [DONE]\r\n\r\n"
    )
    for i in range(len(stream) + 1):
        out = through([stream[:i], stream[i:]])
        assert texts(out) == MASKED
        assert b": keep-alive\r\n\r\n" in out and b"data: not json at all\r\n\r\n" in out
        assert out.endswith(b"data: [DONE]\r\n\r\n")


def test_no_secrets_configured_is_a_no_op() -> None:
    data = resp_delta(orjson.dumps(KEY))
    assert through([data], ()) == data


# Streams a client can receive: Responses or Chat deltas, LF or CRLF, with comments, a
# non-JSON event and a terminator; the text either echoes the key (split over the deltas
# anywhere, each character possibly `\u`-escaped in upper or lower case) or does not (then
# it may still hold starts of the key, also longer than the mask shows, and escapes).
NOISE = st.text(alphabet='sk-upstream 0123é"\\', max_size=12)


def _bits(bits: int, start: int) -> Callable[[int], bool]:
    return lambda i: bool(bits >> (start + i) & 1)


@st.composite
def streams(draw: st.DrawFn, echo: bool) -> tuple[bytes, str, str, str]:
    pre, post = draw(NOISE), draw(NOISE)
    middle = KEY if echo else KEY[: draw(st.integers(0, len(KEY) - 1))] + "!"
    text = pre + middle + post
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    bits = draw(st.integers(0, 2 ** len(text) - 1)) if draw(st.booleans()) else 0
    upper = draw(st.booleans())
    chat = draw(st.booleans())
    nl = b"\r\n" if draw(st.booleans()) else b"\n"
    out = [b": ping" + nl + nl]
    pos = 0
    for i, piece in enumerate(pieces):
        literal = escaped(piece, _bits(bits, pos), upper)
        pos += len(piece)
        out.append(chat_delta(literal, nl) if chat else resp_delta(literal, i + 1, nl))
        if i == 1:
            out.append(b"data: [not json]" + nl + nl)
    out.append(CHAT_DONE.replace(b"\n", nl) if chat else RESP_DONE.replace(b"\n", nl))
    return b"".join(out), pre, post, text


@settings(max_examples=300, deadline=None)
@given(streams(echo=True), st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_of_an_echoing_stream_never_shows_the_key(
    stream: tuple[bytes, str, str, str], points: list[int]
) -> None:
    raw, pre, post, _ = stream
    out = through(cut(raw, points))
    assert KEY.encode() not in out
    assert KEY not in texts(out)
    assert texts(out) == pre + MASKED + post  # only the key changed, to its masked form


@settings(max_examples=300, deadline=None)
@given(streams(echo=False), st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_of_a_clean_stream_is_byte_identical(
    stream: tuple[bytes, str, str, str], points: list[int]
) -> None:
    raw, _, _, _ = stream
    assert through(cut(raw, points)) == raw


def test_short_key_starts_any_two_way_split_is_byte_identical() -> None:
    raw = b"".join(
        resp_delta(orjson.dumps(w), i) for i, w in enumerate(["is", "s", "sk", "sk-", "a"])
    )
    raw += RESP_DONE + b"data: [DONE]\n\n"
    for i in range(len(raw) + 1):
        assert through([raw[:i], raw[i:]]) == raw


def test_a_chunk_after_an_event_boundary_cut_anywhere() -> None:
    """Chunks one event each, except one event (the key raw, in a delta, or continuing a soft
    start remembered from the delta before) cut in two anywhere: between `"` and the rest of
    the key too."""
    for nl in (b"\n", b"\r\n"):
        first = resp_delta(b'"it is"', 1, nl)  # `s` remembered
        for cut_event, after, want in [
            (b"data: " + KEY.encode() + nl + nl, b"", MASKED),
            (resp_delta(orjson.dumps(f"key {KEY}!"), 2, nl), b"", f"key {MASKED}!"),
            (resp_delta(b'"k-upstream-sec"', 2, nl), b'"ret-0123456789abcdef."', "k-****."),
        ]:
            for i in range(len(cut_event) + 1):
                chunks = [first, cut_event[:i], cut_event[i:]]
                if after:
                    chunks.append(resp_delta(after, 3, nl))
                out = through(chunks)
                assert KEY.encode() not in out, (nl, i)
                assert texts(out) == "it is" + (want if b"delta" in cut_event else ""), (nl, i)


def test_a_new_soft_start_after_a_remembered_one_is_followed() -> None:
    for nl in (b"\n", b"\r\n"):
        words = [b'"it is"', b'"my sk"', b'"-upstream-sec"', b'"ret-0123456789abcdef"', b'"."']
        out = through([resp_delta(w, i, nl) for i, w in enumerate(words)])
        assert texts(out) == f"it ismy {MASKED}."


# ---------------------------------------------------------------- end to end
# (only public behaviour: these also run against the gateway before the masking module)

BODY = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 50}
USAGE = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}


def completed(seq: int) -> bytes:
    resp: dict[str, Any] = {"id": "resp_1", "object": "response", "model": "nusantara-base"}
    resp |= {"status": "completed", "output": [], "usage": USAGE}
    payload = {"type": "response.completed", "sequence_number": seq, "response": resp}
    return b"event: response.completed\ndata: " + orjson.dumps(payload) + b"\n\n"


async def upstream_key(request: web.Request) -> str:
    await request.read()
    return request.headers.get("authorization", "").removeprefix("Bearer ")


async def call(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}{path}", json=body, headers=auth()) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def leaks(headers: dict[str, str], raw: bytes) -> list[str]:
    """Where the key reached the client: header names or values, bytes, or decoded text."""
    found = [k for k, v in headers.items() if KEY in k or KEY in v]
    if KEY.encode() in raw:
        found.append("body bytes")
    if KEY in texts(raw):
        found.append("concatenated delta text")
    try:
        if KEY.encode() in orjson.dumps(orjson.loads(raw)):  # escapes decoded
            found.append("decoded JSON body")
    except orjson.JSONDecodeError:
        pass
    return found


async def serve_stream(
    request: web.Request, chunks: list[bytes], **headers: str
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", **headers})
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk)
        await asyncio.sleep(0.01)  # each write its own chunk at the gateway
    await resp.write_eof()
    return resp


async def test_e2e_header_echo_is_masked(gateway_factory: GatewayFactory) -> None:
    """An upstream header carrying the key reaches no client: JSON answers, streams, and the
    cached copy (whose kept headers include the upstream's request id)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        key = await upstream_key(request)
        headers = {"x-debug-auth": f"Bearer {key}", "x-request-id": f"req-{key}"}
        body = orjson.loads(await request.read() or b"{}")
        if body.get("stream"):
            return await serve_stream(request, [resp_delta(b'"hi"'), completed(2)], **headers)
        answer: dict[str, Any] = {"id": "resp_1", "object": "response", "model": "nusantara-base"}
        answer |= {"status": "completed", "output": [], "usage": USAGE}
        return web.json_response(answer, headers=headers)

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url, cache="true")
        for body in (BODY, {**BODY, "stream": True}):
            for attempt in ("miss", "hit"):
                status, headers, raw = await call(gw.url, "/v1/responses", body)
                assert (status, headers["x-gateway-cache"]) == (200, attempt)
                assert headers["x-upstream-request-id"] == f"req-{MASKED}", (body, attempt)
                if attempt == "miss":  # a replay keeps only some headers
                    assert headers["x-debug-auth"] == f"Bearer {MASKED}", body
                assert leaks(headers, raw) == [], (body, attempt)
    finally:
        await runner.cleanup()


async def test_e2e_json_escaped_echo_in_a_body_is_masked(gateway_factory: GatewayFactory) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = await upstream_key(request)
        message = b'"Incorrect API key provided: ' + escaped(key, lambda i: key[i] in "-e")[1:]
        body = b'{"error":{"message":' + message + b',"type":"invalid_request_error"}}'
        return web.Response(status=401, body=body, content_type="application/json")

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url)
        status, headers, raw = await call(gw.url, "/v1/responses", BODY)
        assert status == 401
        message = orjson.loads(raw)["error"]["message"]
        assert message == f"Incorrect API key provided: {MASKED}"
        assert leaks(headers, raw) == []
    finally:
        await runner.cleanup()


async def test_e2e_json_escaped_echo_in_a_stream_is_masked(
    gateway_factory: GatewayFactory,
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = await upstream_key(request)
        literal = escaped(key, upper=True)
        # the event's bytes arrive in three TCP chunks, splitting the escapes
        event = resp_delta(literal)
        parts = [event[:120], event[120:140], event[140:]]
        return await serve_stream(request, [*parts, completed(2)])

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url)
        status, headers, raw = await call(gw.url, "/v1/responses", {**BODY, "stream": True})
        assert status == 200
        assert texts(raw) == MASKED
        assert leaks(headers, raw) == []
    finally:
        await runner.cleanup()


async def test_e2e_key_split_across_responses_deltas_is_masked(
    gateway_factory: GatewayFactory,
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = await upstream_key(request)
        deltas = [f"Your key is {key[:15]}", key[15:], " — keep it safe."]
        events = [resp_delta(orjson.dumps(d), i + 1) for i, d in enumerate(deltas)]
        return await serve_stream(request, [*events, completed(4)])

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url)
        status, headers, raw = await call(gw.url, "/v1/responses", {**BODY, "stream": True})
        assert status == 200
        assert texts(raw) == f"Your key is {MASKED} — keep it safe."
        assert leaks(headers, raw) == []
        assert b"event: response.completed" in raw
    finally:
        await runner.cleanup()


async def test_e2e_key_split_across_chat_deltas_is_masked(gateway_factory: GatewayFactory) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = await upstream_key(request)
        deltas = ["key: ", key[:2], key[2:20], key[20:], "."]
        events = [chat_delta(orjson.dumps(d)) for d in deltas]
        usage = b'data: {"object":"chat.completion.chunk","choices":[],"usage":'
        usage += b'{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
        return await serve_stream(request, [*events, CHAT_FINISH, usage, b"data: [DONE]\n\n"])

    url, runner = await start_app(echo)
    try:
        gw = await gateway_factory(url)
        messages = [{"role": "user", "content": "what is your key?"}]
        body = {"model": "nusantara-base", "stream": True, "messages": messages}
        status, headers, raw = await call(gw.url, "/v1/chat/completions", body)
        assert status == 200
        assert texts(raw) == f"key: {MASKED}."
        assert leaks(headers, raw) == []
    finally:
        await runner.cleanup()


async def test_e2e_normal_stream_is_byte_identical(gateway_factory: GatewayFactory) -> None:
    """Without an echo the client gets the upstream's bytes unchanged, however they are cut:
    CRLF, comments, starts of the key (`sk`, `sk-up`) and escapes included."""
    words = ["Risk", " desk", " sk", "-up", " ask\\u0073", " sk-upstream-sec", "!", " done"]
    events = [resp_delta(b'"' + w.encode() + b'"', i + 1) for i, w in enumerate(words)]
    stream = b": hello\r\n\r\n" + b"".join(events) + completed(len(words) + 1)
    stream += b"data: [DONE]\n\n"
    chunks = [stream[i : i + 37] for i in range(0, len(stream), 37)]

    async def plain(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await serve_stream(request, chunks)

    url, runner = await start_app(plain)
    try:
        gw = await gateway_factory(url)
        status, _, raw = await call(gw.url, "/v1/responses", {**BODY, "stream": True})
        assert status == 200
        assert raw == stream
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("size", [495, 600, 5000])
@pytest.mark.parametrize("cut", [5, 70, 0.5, -2])
def test_long_keys_are_masked_split_across_deltas(size: int, cut: float) -> None:
    """A long key (a JWT, say) must not break the masker (regexes that spell every prefix of
    a key nested too deep for Python's parser past ~495 bytes) and is masked like any."""
    key = "eyJ" + "".join(chr(ord("a") + (i * 7) % 26) for i in range(size - 3))
    at = int(size * cut) if isinstance(cut, float) else (cut if cut > 0 else size + cut)

    def delta(text: str) -> bytes:
        payload = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                   "content_index": 0, "delta": text}  # fmt: skip
        return b"event: response.output_text.delta\ndata: " + orjson.dumps(payload) + b"\n\n"

    masker = SSEMasker((key.encode(),))
    out = masker.feed(delta("hi " + key[:at])) + masker.feed(delta(key[at:] + " bye"))
    out += masker.feed(delta(key + "!")) + masker.flush()
    text = "".join(
        orjson.loads(line.split(b"data: ", 1)[1])["delta"]
        for line in out.split(b"\n\n")
        if b"data: " in line
    )
    assert text == "hi eyJ**** byeeyJ****!"


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from([b'"', b":", b" ", b"x", b"sk-", b"up", b"-secret", b"\\", b"{", b","])
        | st.binary(max_size=4),
        max_size=40,
    ),
    st.sampled_from([(b"sk-upstream-secret-0123456789abcdef",), (b"sk-up", b"sk-upstream")]),
)
def test_string_ends_by_regex_agree_with_the_scan(
    parts: list[bytes], keys: tuple[bytes, ...]
) -> None:
    data = b"".join(parts)
    s = Secrets(keys)
    assert s.string_ends(data) == s._string_ends_scan(data)


def test_string_ends_past_the_spelled_out_run_fall_back_to_the_scan() -> None:
    key = b"sk-" + bytes(range(65, 91)) * 4  # longer than the regex spells out
    s = Secrets((key,))
    data = b'{"delta":"' + key[:90] + b'"}'
    assert s.string_ends(data) == [key[:90]] == s._string_ends_scan(data)

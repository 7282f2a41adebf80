"""The WebSocket mode's pure parts: client events in, server messages out, and the bridge's
cutting of an SSE stream into messages, held to the SSE decoder under any chunking."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.sse import SSEDecoder
from gateway.websocket import events
from gateway.websocket.sink import EventCut

EVENT = st.sampled_from(
    [
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n',
        b'data: {"type":"x"}\n\n',
        b": keep-alive\n\n",
        b'event: a\ndata: {"a":\ndata: 1}\n\n',  # two data lines
        b'id: 7\nevent: b\ndata:{"b":2}\n\n',  # no space after the colon
        b'data: {"c":3}\r\n\r\n',  # CRLF
        b"data: [DONE]\n\n",
        b'event: mydata:x\ndata: {"d":4}\n\n',
        b"\n",  # a stray blank line
        b'data: {"e":"\xc3\xa9"}\n\n',
    ]
)


@given(st.lists(EVENT, max_size=8), st.lists(st.integers(0, 400), max_size=6))
def test_any_chunking_gives_the_decoders_events(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    expected = [e.data for e in SSEDecoder().feed(stream)]
    bounds = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True)]
    cut = EventCut()
    got = [data for chunk in chunks if chunk for data in cut.feed(chunk)]
    assert got == expected


def test_client_events_are_json_objects_with_a_type() -> None:
    assert events.client_event('{"type":"response.create"}', 64)["type"] == "response.create"
    for bad, code in (
        ("{nope", "invalid_json"),
        ("[1]", "invalid_json"),
        ('{"model":"m"}', "invalid_event"),
        ('{"type":5}', "invalid_event"),
        ("[" * 80 + "]" * 80, "invalid_json"),
    ):
        with pytest.raises(GatewayError) as caught:
            events.client_event(bad, 64)
        assert caught.value.code == code and caught.value.status == 400


def test_create_body_is_a_stream_without_the_envelope() -> None:
    body, lane = events.create_body(
        {"type": "response.create", "model": "m", "stream_id": "s1", "stream": False}
    )
    assert orjson.loads(body) == {"model": "m", "stream": True}
    assert lane == "s1"


def test_error_events_carry_both_shapes() -> None:
    e = GatewayError(429, "insufficient_quota", "budget_exceeded", "No room.", param=None)
    event: dict[str, Any] = orjson.loads(events.error_event(e, "lane-1"))
    assert event == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "insufficient_quota",
            "code": "budget_exceeded",
            "message": "No room.",
            "param": None,
        },
        "code": "budget_exceeded",
        "message": "No room.",
        "param": None,
        "stream_id": "lane-1",
    }


def test_upstream_errors_become_error_events() -> None:
    body = b'{"error":{"message":"bad model","type":"invalid_request_error","code":"nope"}}'
    event = orjson.loads(events.upstream_error_event(404, body))
    assert (event["status"], event["code"], event["error"]["message"]) == (404, "nope", "bad model")
    garbage = orjson.loads(events.upstream_error_event(502, b"<html>bad gateway</html>"))
    assert garbage["error"]["type"] == "upstream_error" and "502" in garbage["message"]


def test_server_messages() -> None:
    assert events.server_message(b"[DONE]", None) is None
    plain = b'{"type":"response.output_text.delta","delta":"hi"}'
    assert events.server_message(plain, None) is plain  # as it came, not re-encoded
    flat = orjson.loads(events.server_message(b'{"type":"error","code":"c","message":"m"}', None))
    assert flat["error"] == {"type": "server_error", "code": "c", "message": "m", "param": None}
    laned = events.server_message(plain, "s")
    assert isinstance(laned, str) and orjson.loads(laned)["stream_id"] == "s"

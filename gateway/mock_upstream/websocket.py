"""The Responses WebSocket mode at ``GET /v1/responses``.

Each ``response.create`` runs through the mock's own streamed ``POST /v1/responses`` (on its
own socket), and each SSE event it writes is sent as one text message: the same events, the
same usage and the same fault knobs as a stream, because it is the stream. The handshake's
upstream key and ``x-mock-*`` headers go with every response. A ``response.steer`` is
acknowledged with ``response.steer.accepted`` and changes nothing; any other event gets an
``error`` event. Every message received is kept in ``MockState.websocket_messages``.
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from gateway.mock_upstream.replies import hex_id
from gateway.mock_upstream.state import MOCK_STATE
from gateway.sse import SSEDecoder

__all__ = ["responses_websocket"]

# the handshake headers each response's stream is asked with
_PASSED: Final = ("authorization", "x-api-key")
INTERNAL: Final = "x-mock-websocket"  # marks the stream a WebSocket response ran through


def _passed(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED}
    headers.update((k, v) for k, v in request.headers.items() if k.lower().startswith("x-mock-"))
    headers[INTERNAL] = "1"
    return headers


def _error(code: str, message: str, status: int = 400) -> str:
    detail = {"type": "invalid_request_error", "code": code, "message": message, "param": None}
    return orjson.dumps({"type": "error", "status": status, "error": detail}).decode()


async def responses_websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(autoping=True)
    if not ws.can_prepare(request).ok:
        return web.json_response(
            {"error": {"message": "Expected a WebSocket upgrade."}}, status=400
        )
    await ws.prepare(request)
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    assert isinstance(sockname, tuple)
    url = f"http://127.0.0.1:{sockname[1]}/v1/responses"
    headers = _passed(request)
    state = request.app[MOCK_STATE]
    async with aiohttp.ClientSession() as session:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            state.websocket_messages.append(msg.data)
            try:
                event = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                await ws.send_str(_error("invalid_json", "The message is not JSON."))
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "response.create":
                await _create(session, ws, url, headers, event)
            elif kind == "response.steer":
                steer = {
                    "id": hex_id("steer_"),
                    "previous_response_id": event.get("previous_response_id"),
                }
                accepted = {"type": "response.steer.accepted", "sequence_number": 0, "steer": steer}
                await ws.send_str(orjson.dumps(accepted).decode())
            else:
                await ws.send_str(_error("unsupported_event", f"Unknown event type {kind!r}."))
    return ws


async def _create(
    session: aiohttp.ClientSession,
    ws: web.WebSocketResponse,
    url: str,
    headers: dict[str, str],
    event: dict[str, Any],
) -> None:
    body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
    body["stream"] = True
    try:
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            if resp.content_type != "text/event-stream":
                sent = await resp.read()
                try:
                    error = orjson.loads(sent).get("error", {})
                except (orjson.JSONDecodeError, AttributeError):
                    error = {"message": sent.decode(errors="replace")}
                message = {"type": "error", "status": resp.status, "error": error}
                await ws.send_str(orjson.dumps(message).decode())
                return
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                for sse in decoder.feed(chunk):
                    if sse.data != b"[DONE]":
                        await ws.send_str(sse.data.decode())
    except (aiohttp.ClientError, ConnectionError):
        # the stream was cut (a fault knob): so is this connection, as a provider's would be
        await ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"stream cut")

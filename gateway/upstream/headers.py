"""Which headers cross the gateway: client -> upstream and upstream -> client. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from gateway.auth import CLIENT_CREDENTIAL_HEADERS

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
    """Client headers minus what must not travel upstream (also every `x-gateway-*`: those
    speak to the gateway, as `x-gateway-user` and `x-gateway-tags` do), plus the gateway's
    own."""
    pairs = list(incoming)
    named = _connection_named(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in pairs:
        lk = k.lower()
        if lk not in _DROP_REQUEST and lk not in named and not lk.startswith("x-gateway-"):
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

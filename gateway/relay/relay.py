"""The one relay: whatever the source, its bytes go to the sink and then past the taps.

A whole body (JSON, a cache entry) is observed as it is, before it is written: the answer is
complete already, and a response id it carries must be owned before the client can ask about
it. A streamed body is written chunk by chunk, each chunk first to the sink and only then to
the taps, so no tap ever delays a byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.relay.sink import Sink
from gateway.relay.taps import Tap


class Source(Protocol):
    status: int
    headers: Mapping[str, str]
    whole: bool  # one body, read at once
    complete: bool  # the body arrived whole (set once it has)
    aborted: bool  # the body broke off: the client must not take what it got as whole

    async def read(self) -> bytes:
        """The next chunk (a whole source: the body); b"" at the end."""
        ...

    def tail(self) -> bytes:
        """What is left to send once `read` has ended (what a filter held back)."""
        ...

    def ending(self) -> bytes:
        """Called after the tail was observed: an ending of the gateway's own, if any (the
        error event of a stream that broke off)."""
        ...


async def relay(source: Source, sink: Sink, taps: Sequence[Tap] = ()) -> None:
    status, headers = source.status, source.headers
    for tap in taps:
        tap.head(status, headers)
    try:
        if source.whole:
            body = await source.read()
            for tap in taps:
                tap.chunk(body)
            await sink.whole(status, headers, body)
            return
        await sink.open(status, headers)
        while chunk := await source.read():
            await sink.write(chunk)
            for tap in taps:
                tap.chunk(chunk)
        for last in (source.tail, source.ending):
            if extra := last():
                await sink.write(extra)
                for tap in taps:
                    tap.chunk(extra)
        if source.aborted:
            sink.abort()
        else:
            await sink.close()
    finally:
        complete = source.complete
        for tap in taps:
            await tap.end(complete)

"""Taps: observers of an answer, called after each write with what the client got (masked).

A tap never changes a byte and never delays one: `chunk` is synchronous and cheap, and the
whole answer's work waits for `end`. Taps run on every kind of answer; a cache hit or a
flight's follower gets only the taps that apply to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from gateway.cache.entry import KEPT_HEADERS, CacheEntry
from gateway.cache.store import CacheStore
from gateway.context import Outcome
from gateway.owners import OwnerStore as Owners
from gateway.redis_link import StateUnavailable
from gateway.stream_watch import StreamWatch
from gateway.usage import StreamSummary, finish_reason, usage_from_body


class Tap(Protocol):
    def head(self, status: int, headers: Mapping[str, str]) -> None: ...

    def chunk(self, data: bytes) -> None: ...

    async def end(self, complete: bool) -> None:
        """The answer ended; `complete` when it arrived whole (a stream: cleanly)."""
        ...


class BodyUsage:
    """A whole JSON body: usage, the response's id, model and finish reason."""

    __slots__ = ("obj", "out", "owner", "owners", "parse")

    def __init__(
        self, out: Outcome, parse: bool, owners: Owners | None, owner: tuple[str, str]
    ) -> None:
        self.out, self.parse, self.owners, self.owner = out, parse, owners, owner
        self.obj: dict[str, Any] | None = None

    def head(self, status: int, headers: Mapping[str, str]) -> None:
        self.parse = self.parse and status == 200

    def chunk(self, data: bytes) -> None:
        if not self.parse:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        self.obj = obj
        out = self.out
        out.usage = usage_from_body(obj)
        rid, model = obj.get("id"), obj.get("model")
        if isinstance(rid, str):
            out.response_id = rid
            if self.owners is not None:  # known before the client can ask about it
                self.owners.remember(rid, self.owner)
        if isinstance(model, str):
            out.response_model = model
        if obj.get("object") == "response":
            out.finish_reasons = (finish_reason(obj),)

    @property
    def completed(self) -> bool:
        return self.obj is not None and self.obj.get("status") == "completed"

    async def end(self, complete: bool) -> None:
        return None


class StreamUsage:
    """An SSE stream: lifecycle, usage and time to the first output event."""

    __slots__ = ("out", "owner", "owners", "started", "summary", "watch")

    def __init__(
        self, out: Outcome, started: float, owners: Owners | None, owner: tuple[str, str]
    ) -> None:
        self.out, self.started, self.owners, self.owner = out, started, owners, owner
        self.watch = StreamWatch()
        self.summary: StreamSummary = self.watch.summary

    def head(self, status: int, headers: Mapping[str, str]) -> None:
        return None

    def chunk(self, data: bytes) -> None:
        if self.watch.feed(data) and self.out.ttft is None:
            self.out.ttft = time.perf_counter() - self.started

    @property
    def completed(self) -> bool:
        s = self.summary
        return s.terminal and s.status == "completed"

    async def end(self, complete: bool) -> None:
        out, s = self.out, self.summary
        out.usage = s.usage
        out.response_id, out.response_model = s.response_id, s.response_model
        out.finish_reasons = s.finish_reasons
        if s.error_code and not out.error:
            out.error = s.error_code
        if s.response_id and self.owners is not None:
            self.owners.remember(s.response_id, self.owner)


class Completion(Protocol):
    @property
    def completed(self) -> bool: ...


class CacheRecorder:
    """Records a 200 answer, and stores it when it completed whole and within the size cap."""

    __slots__ = (
        "cap",
        "entry",
        "headers",
        "key",
        "make",
        "parts",
        "result",
        "size",
        "store",
    )

    def __init__(
        self,
        store: CacheStore,
        key: str,
        cap: int,
        result: Completion,
        make: Callable[[tuple[tuple[str, str], ...], bytes], CacheEntry],
    ) -> None:
        self.store, self.key, self.cap, self.result = store, key, cap, result
        self.make = make
        self.parts: list[bytes] | None = []
        self.size = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.entry: CacheEntry | None = None

    def head(self, status: int, headers: Mapping[str, str]) -> None:
        if status != 200:
            self.parts = None
            return
        self.headers = tuple((k, v) for k, v in headers.items() if k.lower() in KEPT_HEADERS)

    def chunk(self, data: bytes) -> None:
        if self.parts is None:
            return
        self.size += len(data)
        if self.size > self.cap:
            self.parts = None
        else:
            self.parts.append(data)

    async def end(self, complete: bool) -> None:
        """Makes the entry; `store` puts it, once clients and followers have their answer."""
        if self.parts is None or not complete or not self.result.completed:
            return
        self.entry = self.make(self.headers, b"".join(self.parts))

    async def store_entry(self, log: Any) -> None:
        """Put the entry, if there is one. A store that fails costs a hit, never an answer."""
        if self.entry is None:
            return
        try:
            await self.store.put(self.key, self.entry)
        except StateUnavailable:
            return  # counted where it failed; the next request bypasses the cache
        except Exception:
            log.exception("storing a cache entry failed")

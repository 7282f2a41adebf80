"""Single-flight across replicas, through Redis.

A flight is claimed with one ``SET lead <token> NX PX <lease> GET`` on
``{prefix}{f:<cache key>}:lead``: the replica whose SET lands leads; every other replica
gets the leader's token and follows. The leader renews its lease every `lease`/3 seconds
(one pipelined call for all the flights a replica leads) and deletes the key when its flight
ends, after the end is in the log.

The leader appends the head, each chunk and the end to a Redis Stream,
``{prefix}{f:<cache key>}:log:<token>``, with XADD. A Stream rather than pub/sub because it is
a log: a follower that joins late reads it from the first entry, and one that reads slowly
reads at its own pace, while pub/sub would need a replay of its own and drop messages for a
slow subscriber. The leader never waits on Redis: its in-process `Flight` serves its own
clients and the local followers, and one writer task per replica sends what all its flights
published, in one pipeline per round trip. A follower replica reads a log with one task
(XREAD BLOCK from the first entry) into an in-process `Flight` that all its followers of that
flight follow, each at its own pace.

A leader that stops (its replica died, or lost Redis) stops renewing: once its lease has run
out and its log holds no end, its followers' replica ends the flight. A follower that has
had nothing yet makes its own call; a stream already under way ends with the contract's
`upstream_stream_interrupted` error event, never a hang. Logs expire `linger` seconds after
their last write; a stream longer than `max_log_bytes` stops being shared past that size
(its remote followers get the error event), so one huge answer cannot fill Redis.

Each flight's keys share the hash tag ``{f:<cache key>}`` (one slot per flight, so flights
spread over a Redis Cluster while a flight's lead key and log stay together).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, cast

import orjson

from gateway import errors
from gateway.cache.entry import CacheEntry
from gateway.cache.flight import Flight, FlightLike
from gateway.redis_link import BLOCK_MS, COMMAND_TIMEOUT, RedisLink, StateUnavailable
from gateway.stream_watch import StreamWatch
from gateway.usage import Usage

LEASE = 3.0  # seconds a leader's claim lasts without a renewal
# seconds a log stays after its last write: each follower replica reads a log into memory as
# fast as Redis gives it (its clients then read at their own pace), so a log is needed only
# until the replicas following it have read its end
LINGER = 10.0
MAX_LOG_BYTES = 32 * 1024 * 1024
READ_COUNT = 512  # log entries a follower's read takes at most

# run with EVAL inside pipelines: a registered script would make every pipeline that uses it
# ask SCRIPT EXISTS first, one more round trip; Redis keeps the compiled script by its hash
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_LOST = "The gateway replica leading this shared stream stopped before its end."
_HEAD, _CHUNK, _END, _OVER = b"h", b"c", b"f", b"x"


def _usage(u: Usage | None) -> bytes:
    if u is None:
        return b"null"
    return orjson.dumps(
        [u.input_tokens, u.output_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens]
    )


class LedFlight(Flight):
    """A flight led here: served from memory to this replica's clients, and sent to the log.

    `readers` starts at 1, a place for the followers on other replicas: the leader cannot
    know when they stop reading, so its stream is read to its end."""

    __slots__ = ("broken", "lead_key", "log_key", "registry", "released", "sent", "token")

    def __init__(self, stream: bool, registry: RedisFlights, lead_key: str, token: str) -> None:
        super().__init__(stream)
        self.registry, self.lead_key, self.token = registry, lead_key, token
        self.log_key = f"{lead_key[: -len('lead')]}log:{token}"
        self.readers = 1
        self.sent = 0
        self.broken = False  # the log is not written any more (Redis failed, or too long)
        self.released = asyncio.Event()

    def publish_head(self, status: int, headers: tuple[tuple[str, str], ...], shared: bool) -> None:
        super().publish_head(status, headers, shared)
        if self.broken:
            return
        fields = {b"t": _HEAD, b"s": str(status), b"h": orjson.dumps(headers)}
        self.registry.send(self, {**fields, b"x": b"1" if shared else b"0"})

    def publish(self, chunk: bytes) -> None:
        super().publish(chunk)
        if self.broken or not chunk:
            return
        self.sent += len(chunk)
        if self.sent > self.registry.max_log_bytes:
            self.registry.send(self, {b"t": _OVER})
            self.broken = True
            return
        self.registry.send(self, {b"t": _CHUNK, b"d": chunk})

    def finish(self, entry: CacheEntry | None, usage: Usage | None) -> None:
        super().finish(entry, usage)
        if self.broken:
            self.registry.release(self)
            return
        body = b"" if entry is None or not self.shared else entry.to_bytes()
        self.registry.send(self, {b"t": _END, b"e": body, b"u": _usage(usage)})


class RedisFlights:
    """`FlightRegistry` shared through Redis (see the module docstring).

    `join_local`: a request joins a flight led on this replica without asking Redis (off
    only to exercise the path of another replica in tests).
    """

    def __init__(
        self,
        link: RedisLink,
        *,
        lease: float = LEASE,
        linger: float = LINGER,
        max_log_bytes: int = MAX_LOG_BYTES,
        join_local: bool = True,
    ) -> None:
        self.link, self.lease, self.linger = link, lease, linger
        self.max_log_bytes, self.join_local = max_log_bytes, join_local
        self._leading: dict[str, LedFlight] = {}
        self._following: dict[str, tuple[str, Flight]] = {}  # key -> (leader's token, flight)
        self._queue: asyncio.Queue[tuple[LedFlight, dict[bytes, Any]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    def _keys(self, key: str) -> str:
        return f"{self.link.prefix}{{f:{key}}}:lead"

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self) -> None:
        if not self._background:
            self._background = [self._spawn(self._write()), self._spawn(self._beat())]

    async def claim(self, key: str, stream: bool) -> tuple[Flight, bool]:
        if self.join_local:
            mine = self._leading.get(key)
            if mine is not None and not mine.done:
                return mine, False
        followed = self._following.get(key)
        if followed is not None and not followed[1].done:
            return followed[1], False
        self._start()
        lead_key, token = self._keys(key), uuid.uuid4().hex
        ms = int(self.lease * 1000)
        held = await self.link.run(
            "flight_claim",
            lambda: self.link.client.set(lead_key, token, nx=True, px=ms, get=True),
        )
        if held is None:
            led = self._leading[key] = LedFlight(stream, self, lead_key, token)
            return led, True
        leader = held.decode() if isinstance(held, bytes) else str(held)
        followed = self._following.get(key)
        if followed is not None and followed[0] == leader:
            return followed[1], False
        flight = Flight(stream)
        self._following[key] = (leader, flight)
        self._spawn(self._pump(key, lead_key, leader, flight))
        return flight, False

    async def land(self, key: str, flight: FlightLike) -> None:
        if not flight.done:
            flight.finish(None, None)
        if isinstance(flight, LedFlight):
            # the end must be in the log and the claim gone before a newcomer claims anew;
            # bounded: a Redis that does not answer lets the claim run out on its own
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COMMAND_TIMEOUT * 2 + 0.1):
                    await flight.released.wait()
        if self._leading.get(key) is flight:
            del self._leading[key]

    def __len__(self) -> int:
        return len(self._leading)

    def send(self, flight: LedFlight, fields: dict[bytes, Any]) -> None:
        """Queue an entry for `flight`'s log; the writer sends it (never waits)."""
        self._queue.put_nowait((flight, fields))

    def release(self, flight: LedFlight) -> None:
        """A broken flight's end: nothing more goes to its log."""
        flight.released.set()

    async def _write(self) -> None:
        """Send what the flights published, in order, as many entries per round trip as
        were queued meanwhile. A flight whose write failed writes nothing more: its log
        never has a gap, and its followers see its claim run out."""
        linger = int(self.linger * 1000)
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 1024:
                batch.append(self._queue.get_nowait())
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    await self._send(batch, pipe, linger)
            except Exception:  # whatever it was, these flights' logs cannot be trusted now
                for flight, _ in batch:
                    flight.broken = True
                    if flight.done:
                        flight.released.set()

    async def _send(
        self, batch: list[tuple[LedFlight, dict[bytes, Any]]], pipe: Any, linger: int
    ) -> None:
        """One round trip: `batch` to the logs, the claims of flights that ended released."""
        logs: dict[str, LedFlight] = {}
        ended: list[LedFlight] = []
        for flight, fields in batch:
            kind = fields[b"t"]
            if flight.broken and kind != _OVER:
                if kind == _END:
                    flight.released.set()
                continue
            pipe.xadd(flight.log_key, cast("dict[Any, Any]", fields))
            logs[flight.log_key] = flight
            if kind in (_END, _OVER):  # newcomers lead anew
                pipe.eval(_RELEASE, 1, flight.lead_key, flight.token)
                if kind == _END:
                    ended.append(flight)
        if not logs:
            return
        for log in logs:
            pipe.pexpire(log, linger)
        try:
            await self.link.run("flight_publish", pipe.execute)
        except StateUnavailable:
            for flight in logs.values():
                flight.broken = True
        for flight in ended:
            flight.released.set()

    async def _beat(self) -> None:
        """Renew the claim of every flight led here, every `lease`/3 seconds."""
        ms = int(self.lease * 1000)
        while True:
            await asyncio.sleep(self.lease / 3)
            live = [f for f in self._leading.values() if not (f.done or f.broken)]
            if not live:
                continue
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    for f in live:
                        pipe.eval(_RENEW, 1, f.lead_key, f.token, ms)
                    renewed = await self.link.run("flight_heartbeat", pipe.execute)
            except StateUnavailable:
                continue  # the claims run out: followers elsewhere end or take over
            for f, ok in zip(live, renewed, strict=True):
                if not ok:  # another replica may lead this key now: stop sharing ours
                    f.broken = True

    async def _pump(self, key: str, lead_key: str, leader: str, flight: Flight) -> None:
        """Read a flight led elsewhere into `flight`, until its end or its leader's loss."""
        log_key = f"{lead_key[: -len('lead')]}log:{leader}"
        watch = StreamWatch() if flight.stream else None
        last = b"0-0"
        try:
            while True:
                got = await self._read(log_key, last, BLOCK_MS)
                if not got:
                    if await self._leads(lead_key, leader):
                        continue
                    # the claim is gone: an end written just before it would be read now
                    got = await self._read(log_key, last, None)
                    if not got:
                        break
                for entry_id, fields in got:
                    last = entry_id
                    if not self._apply(flight, fields, watch):
                        return
        except (StateUnavailable, KeyError, TypeError, ValueError):
            pass  # Redis went away, or the log holds what no leader writes: the flight is lost
        finally:
            if self._following.get(key, ("", None))[1] is flight:
                del self._following[key]
            self._lost(flight, watch)

    async def _read(
        self, log_key: str, last: bytes, block: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        blocking = self.link.blocking
        got: Any = await self.link.run(
            "flight_read", lambda: blocking.xread({log_key: last}, count=READ_COUNT, block=block)
        )
        return list(got[0][1]) if got else []

    async def _leads(self, lead_key: str, leader: str) -> bool:
        held = await self.link.run("flight_read", lambda: self.link.client.get(lead_key))
        return isinstance(held, bytes) and held.decode() == leader

    @staticmethod
    def _apply(flight: Flight, fields: dict[bytes, bytes], watch: StreamWatch | None) -> bool:
        """One log entry into the local flight; False at its end."""
        kind = fields.get(b"t")
        if kind == _CHUNK:
            data = fields[b"d"]
            if watch is not None:
                watch.feed(data)
            flight.publish(data)
            return True
        if kind == _HEAD:
            headers = tuple((str(k), str(v)) for k, v in orjson.loads(fields[b"h"]))
            flight.publish_head(int(fields[b"s"]), headers, fields[b"x"] == b"1")
            return True
        if kind == _END:
            u = orjson.loads(fields[b"u"])
            usage = None if u is None else Usage(*u)
            body = fields[b"e"]
            flight.finish(CacheEntry.from_bytes(body) if body else None, usage)
            return False
        return False  # past the size that is shared, or an entry this version cannot read

    @staticmethod
    def _lost(flight: Flight, watch: StreamWatch | None) -> None:
        if flight.done:
            return
        if flight.stream and flight.shared and watch is not None:
            code = "upstream_stream_interrupted"
            ending = errors.stream_interrupted_event(watch.summary.next_sequence, _LOST, code)
            flight.publish(watch.terminator() + ending)
        flight.finish(None, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

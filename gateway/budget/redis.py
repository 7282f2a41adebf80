"""Budget windows in Redis, shared by every gateway process naming the same server and prefix.

Semantics are `BudgetStore`'s, as the in-process store keeps them; what changes is where the
counters live. Reserve and settle are each one Lua script (`redis_scripts`) over all of a
team's windows, so the overshoot bound holds for all replicas' requests together.

Keys: `{prefix}budget:{team}:epoch` and, per window period, the hash
`{prefix}budget:{team}:{per}:{unit}:{period start}`, where `{team}` is `team_tag`'s escaped,
hash-tagged name: one team's keys share a Redis Cluster slot, and no team name reaches
another's keys. A period's counter expires `GRACE` seconds after the period ends (`total`
never does).

Amounts are integers: tokens, requests, and USD in nano-dollars. Integer counters never
drift, and HINCRBY on them is exact to 2^63; a nano-dollar is below any per-token price
(0.025 USD per million tokens is 25 nano-dollars a token), so rounding each request's cost to
one costs at most half a nano-dollar per request. (Micro-dollars would round a 4-token request
at 0.10 USD per million, 0.4 micro-dollars, to nothing.)

Counters Redis does not hold (at start, after a restart that lost them, after FLUSHALL, or a
new period) are rebuilt from the ledger, once, under a lock that the other replicas wait on;
reading the windows rebuilds them too.
Holds of requests in flight when Redis lost its data are lost with it; their settles never
take a counter below 0 nor release holds made since (the team's epoch tells them apart).
After Redis failed to answer, this process sets each team's counters from the ledger again on
its next reserve (`used` from the ledger, holds kept): requests admitted or settled while
Redis was away are counted, and so is a Redis that came back from an older snapshot.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import redis.asyncio as redis

from gateway.budget import redis_scripts as lua
from gateway.budget.store import Rejection, Reservation, WindowState, amount, window_name
from gateway.budget.windows import seconds_until, window_bounds
from gateway.ledger.records import Charge
from gateway.redis_state import StateUnavailable, answering, team_tag
from gateway.settings import BudgetRule, Team

__all__ = ["RedisBudgetStore"]

NANO = 10**9  # nano-dollars per USD
GRACE = 3600  # seconds a period's counter outlives the period (replica clocks may differ)
LOCK_MS = 5000  # a seeder that dies holding the lock delays the others at most this long
WAIT_STEP = 0.02  # seconds between looks at another replica's seed
ROUNDS = 3  # seed-and-retry rounds before a request gives up on a counter
RECOVER_EVERY = 1.0  # seconds between looks for a Redis that did not answer
RECOVER_AGAIN = 3.0  # seconds to the second correction: records still on their way landed
MAX_UNRELEASED = 100_000  # holds remembered while Redis is away; past it they wait for expiry

# what the ledger says each team was charged since an instant: `ReportReader.charged_since`
ChargedSince = Callable[[float], Awaitable[Mapping[str, Charge]]]


def units(unit: str, tokens: float, usd: float, requests: int) -> int:
    """An amount as the integer a counter holds, within [0, CAP]."""
    value = round(usd * NANO) if unit == "usd" else int(tokens if unit == "tokens" else requests)
    return min(max(value, 0), lua.CAP)


def shown(unit: str, value: bytes | int) -> float:
    """A counter's integer back in the unit's own terms."""
    return int(value) / NANO if unit == "usd" else float(int(value))


class RedisBudgetStore:
    """A `BudgetStore` in Redis. `charged_since` reads the ledger for rebuilds; `on_error` is
    told the operation each time Redis does not answer (`gateway_state_errors_total`); it
    may be replaced once the store is built, as the gateway that counts them is."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        charged_since: ChargedSince,
        *,
        on_error: Callable[[str], None] = lambda operation: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._charged_since = charged_since
        self.on_error = on_error
        self._counters = client.register_script(lua.COUNTERS)
        self._seed = client.register_script(lua.SEED)
        self._settle = client.register_script(lua.SETTLE)
        self._unlock = client.register_script(lua.UNLOCK)
        self._outages = 0  # times Redis did not answer this process
        self._checked: dict[str, int] = {}  # team -> outages when its counters were last set
        # reservations whose settle Redis did not answer: their holds are released once it
        # does (their spending comes from the ledger with the next `_fresh`)
        self._unreleased: list[Reservation] = []
        self._bases: dict[str, bytes] = {}  # team -> its keys' common start
        self._teams: dict[str, Team] = {}  # the teams seen with budgets, latest settings
        self._clock = clock
        self._recovering: asyncio.Task[None] | None = None
        self._closed = False
        self._periods: dict[str, tuple[float, float]] = {}  # window -> its current period

    def _failed(self, operation: str) -> None:
        self._outages += 1
        self.on_error(operation)
        if self._recovering is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._recovering = loop.create_task(self._recover())

    def _gave_up(self) -> StateUnavailable:
        """Counters still missing after every round of seeding (a seeder holding the lock
        past its time), or a ledger that cannot be read: the request is treated as if Redis
        had not answered."""
        self._failed("budget_rebuild")
        return StateUnavailable("budget_rebuild")

    def _team_key(self, team: str) -> bytes:
        """`{prefix}budget:{team}:`, which every key of the team starts with."""
        got = self._bases.get(team)
        if got is None:
            got = self._bases[team] = f"{self._prefix}budget:{team_tag(team)}:".encode()
        return got

    def _period(self, per: str, now: float) -> tuple[float, float]:
        """`window_bounds`, remembered while `now` stays in the same period."""
        got = self._periods.get(per)
        if got is None or not got[0] <= now < got[1]:
            got = self._periods[per] = window_bounds(per, now)
        return got

    def _keys(self, team: str, rules: Sequence[BudgetRule], now: float) -> list[bytes]:
        base = self._team_key(team)
        return [base + b"epoch"] + [
            _counter(base, r.per, r.unit, self._period(r.per, now)[0]) for r in rules
        ]

    async def reserve(
        self, team: Team, tokens: int, usd: float, now: float, requests: int = 1
    ) -> Reservation | Rejection:
        rules = team.budgets
        if not rules:
            return Reservation(team.name, tokens, usd, (), requests)
        self._teams[team.name] = team
        bounds = [self._period(r.per, now) for r in rules]
        base = self._team_key(team.name)
        keys = [base + b"epoch"]
        amounts = []
        for rule, (start, end) in zip(rules, bounds, strict=True):
            if amount(rule, tokens, usd, requests) > rule.limit:  # no counter can change this
                return Rejection(team.name, window_name(rule), seconds_until(end, now), rule.limit)
            keys.append(_counter(base, rule.per, rule.unit, start))
            amounts.append(b"%d %d" % (units(rule.unit, tokens, usd, requests), _limit(rule)))
        args = [b"reserve", b" ".join(amounts)]
        with answering("budget_reserve", self._failed):
            await self._fresh(team, now)
            if self._unreleased:
                await self._release_unreleased(now)
            for _ in range(ROUNDS):
                got = await self._counters(keys=keys, args=args)
                code, rest = int(got[0]), got[1:]
                if code == lua.ADMITTED:
                    windows = tuple(
                        (r.per, r.unit, b[0]) for r, b in zip(rules, bounds, strict=True)
                    )
                    return Reservation(team.name, tokens, usd, windows, requests, rest[0].decode())
                if code == lua.REFUSED:
                    return _refusal(team.name, [rules[int(i) - 1] for i in rest], now)
                await self._rebuild(team, [rules[int(i) - 1] for i in rest], now)
        raise self._gave_up()

    async def settle(
        self,
        reservation: Reservation,
        tokens: int,
        usd: float,
        now: float,
        requests: int | None = None,
    ) -> None:
        r = reservation
        if not r.windows:
            return
        count = r.requests if requests is None else requests
        try:
            with answering("budget_settle", self._failed):
                await self._apply(r, tokens, usd, count, now)
        except StateUnavailable:
            if len(self._unreleased) < MAX_UNRELEASED:
                self._unreleased.append(r)
            raise

    async def _apply(
        self, r: Reservation, tokens: int, usd: float, requests: int, now: float
    ) -> None:
        base = self._team_key(r.team)
        keys: list[bytes] = []
        amounts = []
        for per, unit, start in r.windows:
            keys += [
                _counter(base, per, unit, start),
                _counter(base, per, unit, self._period(per, now)[0]),
            ]
            held = units(unit, r.tokens, r.usd, r.requests)
            amounts.append(b"%d %d" % (held, units(unit, tokens, usd, requests)))
        await self._settle(keys=keys, args=[r.epoch.encode(), b" ".join(amounts)])

    async def _release_unreleased(self, now: float) -> None:
        """Release the holds of settles Redis did not answer (spending nothing: `_fresh`
        takes what they spent from the ledger). A settle that timed out after Redis ran it
        is released twice: never below 0, and better than a hold kept for ever."""
        pending, self._unreleased = self._unreleased, []
        while pending:
            try:
                await self._apply(pending[-1], 0, 0.0, 0, now)
            except BaseException:
                self._unreleased += pending
                raise
            pending.pop()

    async def windows(self, team: Team, now: float) -> list[WindowState]:
        rules = team.budgets
        if not rules:
            return []
        keys = self._keys(team.name, rules, now)
        with answering("budget_windows", self._failed):
            for _ in range(ROUNDS):
                got = await self._counters(keys=keys, args=[b"read"])
                if int(got[0]) == lua.READ:
                    out = []
                    for i, rule in enumerate(rules):
                        start, end = self._period(rule.per, now)
                        used, held = got[1 + 2 * i], got[2 + 2 * i]
                        out.append(
                            WindowState(
                                rule.per,
                                rule.unit,
                                rule.limit,
                                shown(rule.unit, used),
                                shown(rule.unit, held),
                                start,
                                end,
                            )
                        )
                    return out
                await self._rebuild(team, [rules[int(i) - 1] for i in got[1:]], now)
        raise self._gave_up()

    async def restore(
        self, teams: Sequence[Team], charged: Mapping[float, Mapping[str, Charge]], now: float
    ) -> None:
        with answering("budget_restore", self._failed):
            for team in teams:
                if team.budgets:
                    await self._write(team, team.budgets, charged, now, "set")
                    self._checked[team.name] = self._outages

    @property
    def shared(self) -> bool:
        return True

    async def reachable(self) -> bool:
        try:
            with answering("ping", self._failed):
                await self._client.ping()
        except StateUnavailable:
            return False
        return True

    async def _answers(self) -> bool:
        """Whether Redis answers a ping (the recovery's own looks: not counted as errors)."""
        try:
            with answering("ping", lambda operation: None):
                await self._client.ping()
        except StateUnavailable:
            return False
        return True

    async def close(self) -> None:
        self._closed = True
        if self._recovering is not None:
            self._recovering.cancel()
            await asyncio.wait([self._recovering])
        await self._client.aclose()

    async def _fresh(self, team: Team, now: float) -> None:
        """After Redis failed to answer this process, raise the team's counters to what the
        ledger charged, once per outage: what was admitted or settled meanwhile is counted.
        Never lowered: a request settled in Redis whose record is not in the ledger yet (any
        replica's, flushed a moment later) is counted there already."""
        if self._checked.get(team.name, 0) == self._outages:
            return
        self._checked[team.name] = self._outages  # concurrent requests do not do it again
        try:
            charged = await self._ledger(team.budgets, now)
            await self._write(team, team.budgets, charged, now, "raise")
        except BaseException:
            self._checked.pop(team.name, None)
            raise

    async def _recover(self) -> None:
        """Redis did not answer this process: once it does again, release the holds whose
        settles it missed and correct every team's counters from the ledger, without waiting
        for a request of that team; once more a little later, for records that were still on
        their way to the ledger (every replica flushes within moments)."""
        try:
            while not await self._answers():  # noqa: ASYNC110 (Redis sends no event back)
                await asyncio.sleep(RECOVER_EVERY)
            for _ in range(2):
                outages = self._outages
                now = self._clock()
                with answering("budget_recover", self._failed):
                    if self._unreleased:
                        await self._release_unreleased(now)
                    for team in list(self._teams.values()):
                        self._checked.pop(team.name, None)
                        await self._fresh(team, now)
                if self._outages != outages:
                    return  # Redis went away again: that failure starts a recovery of its own
                await asyncio.sleep(RECOVER_AGAIN)
        except StateUnavailable:
            pass  # counted; the next failure starts another recovery
        finally:
            self._recovering = None

    async def _rebuild(self, team: Team, missing: Sequence[BudgetRule], now: float) -> None:
        """Seed counters Redis does not hold from the ledger, under the team's lock; a replica
        that finds the lock taken waits for that seed instead of seeding again."""
        lock = self._team_key(team.name) + b"seed"
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_MS / 1000
        if await self._client.set(lock, token, nx=True, px=LOCK_MS):
            try:
                charged = await self._ledger(missing, now)
                await self._write(team, missing, charged, now, "missing", token)
            finally:
                await self._unlock(keys=[lock], args=[token])
            return
        # polling another process's lock (no event crosses processes); the caller then looks
        # at the counters again
        while await self._client.exists(lock) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(WAIT_STEP)

    async def _ledger(
        self, rules: Sequence[BudgetRule], now: float
    ) -> dict[float, Mapping[str, Charge]]:
        starts = {window_bounds(r.per, now)[0] for r in rules}
        try:
            return {start: await self._charged_since(start) for start in starts}
        except Exception as e:  # the counters cannot be known: as if Redis did not answer
            raise self._gave_up() from e

    async def _write(
        self,
        team: Team,
        rules: Sequence[BudgetRule],
        charged: Mapping[float, Mapping[str, Charge]],
        now: float,
        mode: Literal["missing", "set", "raise"],
        epoch: str = "",
    ) -> None:
        """Seed `rules`' counters with what the ledger charged (`mode`: see `lua.SEED`)."""
        args = [epoch or secrets.token_hex(8), mode]
        for rule in rules:
            start, end = window_bounds(rule.per, now)
            got = charged.get(start, {}).get(team.name)
            used = 0 if got is None else units(rule.unit, got.tokens, got.usd, got.requests)
            ttl = 0 if end == float("inf") else int((end - now + GRACE) * 1000)
            args += [str(used), str(ttl)]
        await self._seed(keys=self._keys(team.name, rules, now), args=args)


def _counter(base: bytes, per: str, unit: str, start: float) -> bytes:
    """The key of a window's counter for the period starting at `start`."""
    return b"%s%s:%s:%d" % (base, per.encode(), unit.encode(), start)


def _limit(rule: BudgetRule) -> int:
    return units(rule.unit, rule.limit, rule.limit, int(rule.limit))


def _refusal(team: str, refusing: Sequence[BudgetRule], now: float) -> Rejection:
    """The refusing window reset last names the refusal (the first in team order on a tie)."""
    worst: Rejection | None = None
    for rule in refusing:
        wait = seconds_until(window_bounds(rule.per, now)[1], now)
        if worst is None or wait > worst.retry_after:
            worst = Rejection(team, window_name(rule), wait)
    assert worst is not None
    return worst

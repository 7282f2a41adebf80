"""Stateful faults: which request fails, and how.

Owns: ``Fault`` (an error status with an optional ``retry-after``, a connection reset or close
before any answer byte, or an answer cut after its first bytes), the fault specs of the
``x-mock-fail-first`` header and ``--fail-status``, the upstream key of a request, and
``Faults`` (per app, on ``MockState.faults``): the queued next-N faults of ``/mock/faults``,
the counters behind ``x-mock-fail-first``, refused and required keys and the ``--fail-ratio``
schedule. ``Faults.decide`` picks what one request gets; ``knobs`` carries it out.

Nothing here runs for a request unless ``Faults.armed`` is set or the request carries
``x-mock-fail-first``: a mock without faults stays on its fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, Literal

__all__ = [
    "FAIL_FIRST",
    "FAULT_ID",
    "MISSING_KEY",
    "REFUSED_KEY",
    "Fault",
    "Faults",
    "Refused",
    "parse_fail_first",
    "parse_fault",
    "request_key",
]

FAIL_FIRST: Final = "x-mock-fail-first"
FAULT_ID: Final = "x-mock-fault-id"
_DROPS: Final = ("reset", "close", "cut")
_MAX_COUNTERS: Final = 10_000  # distinct (fault id, spec) pairs remembered; the oldest go first

Drop = Literal["reset", "close", "cut"]


@dataclass(frozen=True, slots=True)
class Fault:
    """An HTTP error status (400-599), or ``reset`` (RST before any answer byte), ``close``
    (FIN before any answer byte) or ``cut`` (the status line, headers and first bytes, then
    the connection closes)."""

    status: int | Drop
    retry_after: int | None = None  # error statuses: a retry-after header, in seconds
    cut_after: int = 1  # cut: stream events written before the cut (a JSON body: half)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.status == "cut":
            out["cut_after"] = self.cut_after
        elif isinstance(self.status, int) and self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


@dataclass(frozen=True, slots=True)
class Refused:
    """A 401 for the request's upstream key; the message never repeats the key."""

    message: str
    code: str | None


REFUSED_KEY: Final = Refused("Incorrect API key provided.", "invalid_api_key")
MISSING_KEY: Final = Refused(
    "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).",
    None,
)


def _natural(text: str, what: str) -> int:
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"{what} must be a whole number, not {text!r}")
    return int(value)


def make_fault(status: int | str, arg: int | None = None) -> Fault:
    """A fault from its status (an int, digits, or reset/close/cut) and optional argument
    (retry-after seconds for a status, events before a cut)."""
    if isinstance(status, str):
        kind = status.strip().lower()
        if kind in _DROPS:
            if kind == "cut":
                return Fault("cut", cut_after=1 if arg is None else arg)
            if arg is not None:
                raise ValueError(f"{kind} takes no argument")
            return Fault("reset" if kind == "reset" else "close")
        status = _natural(kind, "a fault status")
    if not 400 <= status <= 599:
        raise ValueError(f"a fault status must be 400-599, reset, close or cut, not {status}")
    return Fault(status, retry_after=arg)


def parse_fault(spec: str) -> Fault:
    """``KIND[:ARG]``: KIND is 400-599, reset, close or cut; ARG is retry-after seconds for a
    status, the events before a cut."""
    kind, sep, arg = spec.partition(":")
    return make_fault(kind, _natural(arg, "the fault's argument") if sep else None)


def parse_fail_first(spec: str) -> tuple[Fault, int]:
    """``KIND:N[:ARG]``: the first N requests with this header value get the fault KIND[:ARG]."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError("the form is KIND:N[:ARG], e.g. 503:2, 429:1:2, reset:1")
    count, sep, arg = rest.partition(":")
    n = _natural(count, "the count N")
    if n < 1:
        raise ValueError("the count N must be at least 1")
    return make_fault(kind, _natural(arg, "the fault's argument") if sep else None), n


def request_key(headers: Mapping[str, str]) -> str | None:
    """The upstream key of a request (lower-cased header names): the Authorization bearer
    token, else x-api-key, else None."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


@dataclass(slots=True)
class _Queued:
    fault: Fault
    remaining: int
    path: str  # a path prefix
    key: str | None  # only requests with this upstream key; None: any


class Faults:
    """The mock's stateful faults (one per app). Single-threaded: no awaits in between."""

    def __init__(
        self,
        refused: tuple[str, ...] | frozenset[str] = (),
        required: tuple[str, ...] | frozenset[str] = (),
        fail_ratio: float = 0.0,
        fail_fault: Fault | None = None,
    ) -> None:
        if not 0 <= fail_ratio <= 1:
            raise ValueError(f"fail_ratio must be between 0 and 1, not {fail_ratio}")
        self.queued: list[_Queued] = []
        self.counters: dict[tuple[str, str], int] = {}  # (fault id, spec) -> requests seen
        self.refused: set[str] = set(refused)
        self.required: frozenset[str] = frozenset(required)
        self.ratio = Fraction(fail_ratio).limit_denominator(1_000_000)
        self.ratio_fault = fail_fault or Fault(503)
        self.ratio_seen = 0
        self.armed = False
        self._rearm()

    def _rearm(self) -> None:
        self.armed = bool(self.queued or self.refused or self.required or self.ratio)

    def queue(
        self, fault: Fault, count: int = 1, path: str = "/v1/", key: str | None = None
    ) -> None:
        """The next `count` requests under `path` (with upstream key `key`, if given) get
        `fault`; faults queued earlier are served first."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self.queued.append(_Queued(fault, count, path, key))
        self._rearm()

    def clear(self) -> None:
        """Forget the queued faults and the x-mock-fail-first counters."""
        self.queued.clear()
        self.counters.clear()
        self._rearm()

    def refuse(self, key: str) -> None:
        self.refused.add(key)
        self._rearm()

    def unrefuse(self, key: str) -> None:
        self.refused.discard(key)
        self._rearm()

    def decide(self, path: str, headers: Mapping[str, str]) -> Fault | Refused | None:
        """What this request gets, in order: a 401 for its key, the first matching queued
        fault, its x-mock-fail-first fault, the fail-ratio fault; None: a normal answer.
        Raises ValueError for a malformed x-mock-fail-first."""
        if self.refused or self.required:
            key = request_key(headers)
            if self.required and key not in self.required:
                return REFUSED_KEY if key else MISSING_KEY
            if key in self.refused:
                return REFUSED_KEY
        if self.queued and (fault := self._take_queued(path, headers)) is not None:
            return fault
        if (spec := headers.get(FAIL_FIRST)) is not None:
            fault, n = parse_fail_first(spec)
            counter = (headers.get(FAULT_ID, ""), spec.strip())
            seen = self.counters.pop(counter, 0) + 1
            self.counters[counter] = seen  # re-inserted: the newest are kept longest
            if len(self.counters) > _MAX_COUNTERS:
                del self.counters[next(iter(self.counters))]
            if seen <= n:
                return fault
        if self.ratio:
            self.ratio_seen += 1
            n, r = self.ratio_seen, self.ratio
            # Evenly spread: request n fails when floor(n * r) steps up.
            if (n * r.numerator) // r.denominator > ((n - 1) * r.numerator) // r.denominator:
                return self.ratio_fault
        return None

    def _take_queued(self, path: str, headers: Mapping[str, str]) -> Fault | None:
        for i, queued in enumerate(self.queued):
            if not path.startswith(queued.path):
                continue
            if queued.key is not None and request_key(headers) != queued.key:
                continue
            queued.remaining -= 1
            if queued.remaining == 0:
                del self.queued[i]
                self._rearm()
            return queued.fault
        return None

    def view(self) -> dict[str, Any]:
        """What is pending, for GET /mock/faults."""
        return {
            "faults": [
                {**q.fault.as_dict(), "count": q.remaining, "path": q.path, "key": q.key}
                for q in self.queued
            ],
            "fail_first": [
                {"fault_id": fault_id, "spec": spec, "seen": seen}
                for (fault_id, spec), seen in self.counters.items()
            ],
            "fail_ratio": float(self.ratio),
            "fail_status": self.ratio_fault.as_dict() if self.ratio else None,
            "refused_keys": len(self.refused),
            "required_keys": len(self.required),
        }

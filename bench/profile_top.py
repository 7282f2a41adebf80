"""Sum py-spy's raw (collapsed) stacks into tables: where a process's CPU time goes.

Input: one or more files written by ``py-spy record --format raw`` (one line per distinct
stack, ``root;...;leaf COUNT``, each frame ``function (file:line)``; with ``--function`` the
line is the function's first line, so one function is one row). Output, as plain tables:

- **by concern**: each sample goes to the concern of the frame nearest the leaf that decides
  one (auth, body parse, masking, SSE decode/usage, metrics, logging, ledger, tracing/span,
  cache, budget, aiohttp client, aiohttp server, gateway pipeline, event loop, other); frames
  shared by several concerns (aiohttp's stream reader and writer, asyncio timeouts, multidict,
  yarl) let the caller decide. With ``--us-per-request`` the shares are also shown as
  microseconds per request;
- **self time** by leaf frame, any module;
- **self time of gateway/ and aiohttp/ frames**: each sample to the nearest frame in
  ``gateway/`` or ``aiohttp/``, so time in the libraries a function calls (structlog,
  prometheus_client, asyncio, C extensions) counts to it;
- **inclusive time of gateway/ and aiohttp/ frames**: the samples a function is anywhere in.

    python bench/profile_top.py gateway.raw --top 25 [--us-per-request 420]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_LIB = re.compile(r"^.*?/(?:site-packages|dist-packages|lib/python3\.\d+)/")

CONCERNS = (
    "auth",
    "body parse",
    "masking",
    "SSE decode/usage",
    "metrics",
    "logging",
    "ledger",
    "tracing/span",
    "cache",
    "budget",
    "aiohttp client",
    "aiohttp server",
    "aiohttp (either side)",
    "gateway pipeline",
    "event loop",
    "other",
)


@dataclass(frozen=True, slots=True)
class Frame:
    func: str
    file: str  # shortened: "gateway/proxy.py", "aiohttp/web_protocol.py", "asyncio/events.py"
    line: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{self.func} ({where})" if where else self.func

    @property
    def ours(self) -> bool:
        return self.file.startswith(("gateway/", "aiohttp/")) and not self.file.startswith(_ENTRY)


def short_path(path: str) -> str:
    """A library path from its package down; a gateway (or bench) file from its package."""
    m = _LIB.match(path)
    if m:
        return path[m.end() :]
    for top in ("/gateway/", "/bench/"):
        i = path.rfind(top)
        if i >= 0:
            return path[i + 1 :]
    return path


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "", "")
    return Frame(m["func"], short_path(m["file"]), m["line"] or "")


def read_stacks(paths: Iterable[Path]) -> Iterator[tuple[list[Frame], int]]:
    """(frames root first, sample count) per line of py-spy's raw output."""
    cache: dict[str, Frame] = {}
    for path in paths:
        for raw in path.read_text(errors="replace").splitlines():
            stack, _, count = raw.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = []
            for text in stack.split(";"):
                frame = cache.get(text)
                if frame is None:
                    frame = cache[text] = parse_frame(text)
                frames.append(frame)
            yield frames, int(count)


# gateway functions whose concern is not their module's (py-spy names methods Class.method)
_GATEWAY_FUNCS = {
    ("relay.py", "_read_chunk"): "aiohttp client",
    ("relay.py", "StreamPump._read"): "aiohttp client",
    ("relay.py", "_write"): "aiohttp server",
    ("relay.py", "deliver"): "aiohttp server",
    ("relay.py", "send_whole"): "aiohttp server",
    ("relay.py", "_loads"): "SSE decode/usage",
    ("proxy.py", "_read_body"): "body parse",
    ("proxy.py", "_client_span"): "tracing/span",
    ("exchange.py", "_observe"): "metrics",
    ("exchange.py", "_end_spans"): "tracing/span",
    ("server.py", "read_body"): "body parse",
    ("upstream.py", "UpstreamClient.send"): "aiohttp client",
}
# the process's entry: on every stack of the main thread, so they decide nothing
# (py-spy names a script run as __main__ by its file name alone)
_ENTRY = ("gateway/__main__.py", "gateway/cli.py", "bench/bare_proxy.py", "bare_proxy.py")
# leaves of threads that wait (py-spy can count a waiting thread-pool worker as active)
_IDLE_LEAVES = frozenset(
    {
        ("concurrent/futures/thread.py", "_worker"),
        ("threading.py", "Condition.wait"),
        ("threading.py", "Event.wait"),
        ("threading.py", "Thread._wait_for_tstate_lock"),
        ("queue.py", "Queue.get"),
        ("selectors.py", "EpollSelector.select"),
    }
)
_GATEWAY_MODULES = (
    ("ledger/", "ledger"),
    ("budget/", "budget"),
    ("cache/", "cache"),
    ("auth.py", "auth"),
    ("jsonbody.py", "body parse"),
    ("masking.py", "masking"),
    ("sse_masking.py", "masking"),
    ("redact.py", "masking"),
    ("sse.py", "SSE decode/usage"),
    ("usage.py", "SSE decode/usage"),
    ("telemetry/metrics.py", "metrics"),
    ("telemetry/logging.py", "logging"),
    ("telemetry/tracing.py", "tracing/span"),
    ("server.py", "aiohttp server"),  # the gateway's aiohttp connection handler
)
# stdlib `logging` is left to its caller: the gateway logs through structlog, aiohttp checks
# its own loggers' levels
_LIBRARIES = (
    ("structlog/", "logging"),
    ("prometheus_client/", "metrics"),
    ("opentelemetry/", "tracing/span"),
    ("sqlite3/", "ledger"),
)
# aiohttp modules used by both sides: the caller decides
_AIOHTTP_SHARED = (
    "aiohttp/http_writer.py",
    "aiohttp/streams.py",
    "aiohttp/helpers.py",
    "aiohttp/base_protocol.py",
    "aiohttp/http_parser.py",
    "aiohttp/payload.py",
    "aiohttp/tcp_helpers.py",
    "aiohttp/_cookie_helpers.py",
    "aiohttp/compression_utils.py",
    "aiohttp/typedefs.py",
    "aiohttp/hdrs.py",
)


def frame_concern(frame: Frame) -> str | None:
    """The concern a frame decides, or None when its caller should."""
    file = frame.file
    if file.startswith(_ENTRY):
        return None
    if file.startswith("gateway/"):
        mod = file[len("gateway/") :]
        fixed = _GATEWAY_FUNCS.get((mod, frame.func))
        if fixed is not None:
            return fixed
        for prefix, concern in _GATEWAY_MODULES:
            if mod.startswith(prefix):
                return concern
        return "gateway pipeline"
    if file.startswith("aiohttp/"):
        if file in _AIOHTTP_SHARED:
            return None
        if file.startswith("aiohttp/web"):
            return "aiohttp server"
        if file.startswith(("aiohttp/client", "aiohttp/connector")):
            return "aiohttp client"
        return None
    for prefix, concern in _LIBRARIES:
        if file.startswith(prefix):
            return concern
    return None


def stack_concern(frames: list[Frame]) -> str:
    for frame in reversed(frames):
        concern = frame_concern(frame)
        if concern is not None:
            return concern
    # undecided: a stack py-spy caught cut short, or the loop itself (uvloop is C: epoll,
    # socket reads and the callbacks' dispatch show as the `Runner.run` leaf)
    if any(f.file in _AIOHTTP_SHARED for f in frames):
        return "aiohttp (either side)"
    if any(f.file.startswith(("asyncio/", "uvloop/")) for f in frames):
        return "event loop"
    return "other"


def idle(frames: list[Frame]) -> bool:
    leaf = frames[-1]
    return (leaf.file, leaf.func) in _IDLE_LEAVES


def rooted(frames: list[Frame]) -> bool:
    """Whether py-spy caught the whole stack, down to the thread's entry."""
    first = frames[0]
    return (
        first.func == "<module>"
        or first.file in ("<frozen runpy>", "threading.py")
        or first.file.startswith(_ENTRY)
    )


def nearest_ours(frames: list[Frame]) -> Frame | None:
    for frame in reversed(frames):
        if frame.ours:
            return frame
    return None


@dataclass
class Summary:
    total: int
    idle: int  # dropped: threads waiting
    cut: int  # stacks py-spy did not catch down to the thread's entry
    concerns: Counter[str]
    concern_frames: dict[str, Counter[Frame]]
    self_any: Counter[Frame]
    self_ours: Counter[Frame]
    inclusive_ours: Counter[Frame]


def summarize(stacks: Iterable[tuple[list[Frame], int]]) -> Summary:
    s = Summary(0, 0, 0, Counter(), {}, Counter(), Counter(), Counter())
    for frames, n in stacks:
        if not frames:
            continue
        if idle(frames):
            s.idle += n
            continue
        s.total += n
        if not rooted(frames):
            s.cut += n
        concern = stack_concern(frames)
        s.concerns[concern] += n
        s.self_any[frames[-1]] += n
        ours = nearest_ours(frames) or frames[-1]
        s.self_ours[ours] += n
        s.concern_frames.setdefault(concern, Counter())[ours] += n
        for frame in set(frames):
            if frame.ours:
                s.inclusive_ours[frame] += n
    return s


def _table(rows: list[list[str]], right: int) -> list[str]:
    """Rows of cells as aligned text; the first `right` columns right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if i < right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _top(title: str, counts: Counter[Frame], total: int, n: int, us: float | None) -> list[str]:
    head = ["share", "samples", *(["µs/req"] if us else []), "function (file:line)"]
    rows = [head]
    for frame, count in counts.most_common(n):
        share = count / total
        rows.append(
            [
                f"{100 * share:.1f}%",
                str(count),
                *([f"{share * us:.1f}"] if us else []),
                str(frame),
            ]
        )
    return [title, *_table(rows, len(head) - 1), ""]


def render(s: Summary, top: int, us_per_request: float | None, per_concern: int) -> str:
    if s.total == 0:
        return "no samples\n"
    us = us_per_request
    lines = [
        f"{s.total} samples (all threads; {s.idle} more of threads waiting left out); "
        f"{100 * s.cut / s.total:.0f}% of stacks cut short (not down to the thread's entry: "
        "their outer frames miss from the inclusive table)",
    ]
    if us:
        lines.append(f"µs/req: share times {us:g} µs, the CPU per request given")
    lines.append("")
    head = ["concern", "share", "samples", *(["µs/req"] if us else []), "top frames"]
    rows = [head]
    for concern in sorted(s.concerns, key=lambda c: -s.concerns[c]):
        count = s.concerns[concern]
        share = count / s.total
        frames = s.concern_frames.get(concern, Counter()).most_common(per_concern)
        rows.append(
            [
                concern,
                f"{100 * share:.1f}%",
                str(count),
                *([f"{share * us:.1f}"] if us else []),
                ", ".join(f"{f.func} {f.file} {100 * c / s.total:.1f}%" for f, c in frames),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines.append(
        "by concern (each sample to the frame nearest the leaf that decides one; "
        "top frames: nearest gateway/aiohttp frame)"
    )
    for r in rows:
        cells = [
            r[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)),
        ]
        lines.append("  " + "  ".join([*cells, r[-1]]).rstrip())
    lines.append("")
    lines += _top(f"top {top} self time (leaf frame, any module)", s.self_any, s.total, top, us)
    lines += _top(
        f"top {top} self time of gateway/ and aiohttp/ frames (a sample counts to its "
        "nearest such frame, libraries it calls included; to its leaf if it has none)",
        s.self_ours,
        s.total,
        top,
        us,
    )
    lines += _top(
        f"top {top} inclusive time of gateway/ and aiohttp/ frames",
        s.inclusive_ours,
        s.total,
        top,
        us,
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", type=Path, help="py-spy raw output file(s)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--per-concern", type=int, default=3, help="frames named per concern")
    p.add_argument(
        "--us-per-request",
        type=float,
        default=None,
        help="the process's CPU µs per request, to show shares as µs per request",
    )
    args = p.parse_args(argv)
    summary = summarize(read_stacks(args.raw))
    sys.stdout.write(render(summary, args.top, args.us_per_request, args.per_concern) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gateway replay REQUEST_ID`: send a captured request again through a running gateway
(`POST /admin/requests/{id}/replay`) and print the new answer beside the captured one."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import sys
import textwrap
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson

DEFAULT_ADMIN = "http://127.0.0.1:9464"
TIMEOUT = 600.0  # seconds: the call waits for the replayed request's whole answer
WRAP = 76  # a one-line output is wrapped at this width to be diffed in pieces
# the most lines of each side diffed: difflib's matching grows faster than the text, and an
# output of a few hundred lines repeating (a table, a model in a loop) took a minute at 20,000
DIFF_LINES = 2000
# what a terminal would act on rather than show: C0 and C1 controls but tab and line feed,
# and the marks that reorder text (so no printed line can pass for another)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "replay",
        help="send a captured request again and compare the answers",
        description="Send a captured request again through the gateway, as its team (charged,"
        " never from the cache), and print the new answer beside the captured one.",
    )
    r.add_argument("request_id", metavar="REQUEST_ID", help="the request to send again")
    r.add_argument(
        "--admin",
        metavar="URL",
        help=f"the gateway's admin listener (default: $GATEWAY_ADMIN_URL, else {DEFAULT_ADMIN})",
    )
    r.add_argument(
        "--admin-key",
        metavar="KEY",
        help="the admin key (default: $GATEWAY_ADMIN_KEY; prefer it: arguments show in ps)",
    )
    r.add_argument(
        "--format", choices=("table", "json"), default="table", help="output (default: table)"
    )
    r.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    base = (args.admin or os.environ.get("GATEWAY_ADMIN_URL") or DEFAULT_ADMIN).rstrip("/")
    key = args.admin_key or os.environ.get("GATEWAY_ADMIN_KEY", "")
    if not base.startswith(("http://", "https://")):
        print("gateway replay: --admin must be an http:// or https:// URL", file=sys.stderr)
        return 2
    if not key:
        print(
            "gateway replay: give the admin key (--admin-key or $GATEWAY_ADMIN_KEY)",
            file=sys.stderr,
        )
        return 2
    shown = _without_credentials(base)
    try:
        status, body = asyncio.run(_post(base, key, args.request_id))
    except TimeoutError:
        print(
            f"gateway replay: {shown} did not answer within {TIMEOUT:.0f} s; the replay may"
            " still be running (see `gateway requests`)",
            file=sys.stderr,
        )
        return 1
    except (aiohttp.ClientError, OSError, ValueError) as e:
        print(f"gateway replay: cannot reach {shown}: {type(e).__name__}", file=sys.stderr)
        return 1
    if status != 200 or not isinstance(body, dict) or "original" not in body:
        print(f"gateway replay: {status}: {_message(body)}", file=sys.stderr)
        return 1
    print(
        orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
        if args.format == "json"
        else side_by_side(body)
    )
    return 0


async def _post(base: str, key: str, request_id: str) -> tuple[int, Any]:
    url = f"{base}/admin/requests/{_quote(request_id)}/replay"
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(url, headers={"authorization": f"Bearer {key}"}) as r,
    ):
        raw = await r.read()
        try:
            return r.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return r.status, raw.decode("utf-8", "replace")[:500]


def _quote(request_id: str) -> str:
    return quote(request_id, safe="")


def _without_credentials(url: str) -> str:
    """The URL as it may be printed: without a user and password in it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def shown(text: str) -> str:
    """Text from the gateway (model output, an error page) as it may go to a terminal: every
    control character and reordering mark written out (`\\x1b`), never acted on."""
    return _CONTROLS.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return shown(f"{error.get('code')}: {error.get('message')}")
    return shown(str(body))


def side_by_side(result: dict[str, Any]) -> str:
    """The captured and the new answer in two columns, then a diff of their output text."""
    old, new = result["original"], result
    rows = [
        ("request", old["request_id"], new["request_id"]),
        ("status", _status(old), _status(new)),
        ("latency", f"{old['latency_ms']:.1f} ms", f"{new['latency_ms']:.1f} ms"),
        ("streamed", _yes(old["streamed"]), _yes(new["streamed"])),
    ]
    for name in ("input_tokens", "output_tokens", "reasoning_tokens"):
        rows.append((name.replace("_", " "), _tokens(old, name), _tokens(new, name)))
    rows.append(("cost", f"${old['cost_usd']:.6f}", f"${new['cost_usd']:.6f}"))
    label, width = max(len(r[0]) for r in rows) + 2, max(len(r[1]) for r in rows) + 2
    lines = [f"{'':{label}}{'captured':{width}}replayed"]
    lines += [f"{name:{label}}{a:{width}}{b}" for name, a, b in rows]
    if result.get("redacted_input"):
        lines.append("note: the captured body held [REDACTED] text; it was sent as stored")
    lines.append("")
    lines.append(output_diff(old["output"], new["output"]))
    return shown("\n".join(lines))


def output_diff(old: str, new: str) -> str:
    if old == new:
        return f"output text: the same ({len(new)} characters)"
    a, b = _lines(old), _lines(new)
    head = "output text differs:"
    if max(len(a), len(b)) > DIFF_LINES:
        head = (
            f"output text differs ({len(old)} and {len(new)} characters); the diff of the"
            f" first {DIFF_LINES} lines:"
        )
        a, b = a[:DIFF_LINES], b[:DIFF_LINES]
    diff = difflib.unified_diff(a, b, "captured", "replayed", lineterm="", n=2)
    return head + "\n" + "\n".join(diff)


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    if len(lines) <= 1:  # one long line: diffed in wrapped pieces, not as one change
        return textwrap.wrap(text, WRAP) or [""]
    return lines


def _status(side: dict[str, Any]) -> str:
    error = side.get("error")
    return f"{side['status']} {error}" if error else str(side["status"])


def _tokens(side: dict[str, Any], name: str) -> str:
    usage = side.get("usage")
    return str(usage.get(name, 0)) if isinstance(usage, dict) else "-"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"

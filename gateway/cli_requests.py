"""`gateway requests`: finished requests from the ledger, newest first, with the same filters
as `GET /admin/requests` (tags written KEY=VALUE here)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from gateway import backends, config
from gateway.ledger.listing import FORMATS, render
from gateway.ledger.report import parse_when
from gateway.ledger.search import MAX_LIMIT, RequestFilter, make_filter, parse_limit
from gateway.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], config_help: str) -> None:
    r = sub.add_parser(
        "requests",
        help="list finished requests from the ledger",
        description="List finished requests from the ledger, newest first.",
    )
    r.add_argument("--config", metavar="PATH", help=config_help)
    r.add_argument("--team", help="only this team's requests (default: every team)")
    r.add_argument("--status", help="an HTTP status (429) or a class (5xx) (default: any status)")
    r.add_argument("--model", help="only requests for this model (default: any model)")
    r.add_argument("--user", help="only requests attributed to this user (default: any user)")
    r.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="K=V",
        help="only requests with this tag; repeatable (all must hold) (default: no tag filter)",
    )
    when = "YYYY-MM-DD, an ISO-8601 time or unix seconds"
    r.add_argument(
        "--since", metavar="TIME", help=f"from this time, {when} (default: the first record)"
    )
    r.add_argument("--until", metavar="TIME", help="before this time (default: now)")
    r.add_argument(
        "--limit",
        default="50",
        metavar="N",
        help=f"at most N requests, 1 to {MAX_LIMIT} (default: 50)",
    )
    r.add_argument("--format", choices=FORMATS, default="table", help="output (default: table)")
    r.set_defaults(func=cmd_requests)


def cmd_requests(args: argparse.Namespace) -> int:
    path = args.config or config.default_config_path()
    try:
        settings = config.load(path)
        where = make_filter(
            team=args.team,
            model=args.model,
            user=args.user,
            status=args.status,
            tags=args.tag,
            tag_separator="=",
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
        )
        limit = parse_limit(args.limit)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"gateway requests: {e}", file=sys.stderr)
        return 2
    if (db := backends.absent_ledger(settings)) is not None:
        print(f"gateway requests: no ledger at {db} yet", file=sys.stderr)
        return 1
    try:
        print(asyncio.run(_list(settings, where, limit, args.format)), end="")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        # asyncpg's messages name the host and database, never the password
        print(f"gateway requests: cannot read the ledger: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


async def _list(settings: Settings, where: RequestFilter, limit: int, fmt: str) -> str:
    ledger = backends.build_ledger(settings)
    await ledger.start()
    try:
        page = await ledger.requests(where, limit, None)
    finally:
        await ledger.close()
    captures = backends.build_captures(settings)  # in the ledger's database
    await captures.start()
    try:
        captured = await captures.captured([f.record.request_id for f in page.found])
    finally:
        await captures.close()
    return render(page, captured, fmt)

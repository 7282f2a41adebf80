"""The `gateway` command: serve, demo, check-config, keys, usage, requests, mock-upstream."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
from collections.abc import Sequence

import asyncpg

from gateway import backends, cli_replay, cli_requests, config
from gateway.cli_run import ListenError, run_gateway, use_uvloop
from gateway.demo import cmd_demo
from gateway.telemetry.logging import configure_logging


def cmd_serve(args: argparse.Namespace) -> int:
    path = args.config or config.default_config_path()
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if args.workers < 1:
        print(f"gateway serve: --workers must be 1 or more, not {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.state.store == "local":
        print(
            f"{path}: state.store: --workers {args.workers} needs a shared store "
            "(redis://...); with store: local each worker would keep its own budgets",
            file=sys.stderr,
        )
        return 1
    unavailable = backends.problems(settings)
    for problem in unavailable:
        print(f"{path}: {problem}", file=sys.stderr)
    if unavailable:
        return 1
    logs = settings.telemetry.logs
    configure_logging(logs.level, logs.format, shared_stdout=args.workers > 1)
    host = args.host or settings.listen.host
    port = args.port if args.port is not None else settings.listen.port
    try:
        if args.workers > 1:
            # the supervisor relays no traffic: the default loop serves it (uvloop is the
            # workers')
            from gateway.workers import supervise

            return asyncio.run(supervise(settings, path, host, port, args.workers))
        use_uvloop()
        asyncio.run(run_gateway(settings, host, port, path))
    except ListenError as e:
        print(f"gateway serve: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.path}: ok ({len(settings.upstreams)} upstreams, {len(settings.teams)} teams)")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = "gw-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"# client key for team {args.team} (shown once; give it to the team):")
    print(key)
    print(f"# paste under teams.{args.team}.keys in the config:")
    print(f'- "sha256:{digest}"')
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.ledger.report import parse_by, parse_when, render

    path = args.config or config.default_config_path()
    try:
        settings = config.load(path)
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
        by = parse_by(args.by)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"gateway usage: {e}", file=sys.stderr)
        return 2
    if (db := backends.absent_ledger(settings)) is not None:
        print(f"gateway usage: no ledger at {db} yet", file=sys.stderr)
        return 1

    async def report() -> str:
        ledger = backends.build_ledger(settings)
        await ledger.start()
        try:
            rows = await ledger.report(since, until, by)
        finally:
            await ledger.close()
        return render(rows, by, args.format)

    try:
        print(asyncio.run(report()), end="")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        # asyncpg's messages name the host and database, never the password
        print(f"gateway usage: cannot read the ledger: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, run_mock

    try:
        options = MockOptions(
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s,
            refused_keys=tuple(args.refuse_key),
            required_keys=tuple(args.require_key),
            fail_ratio=args.fail_ratio,
            fail_status=args.fail_status,
        )
    except ValueError as e:
        print(f"gateway mock-upstream: {e}", file=sys.stderr)
        return 2
    run_mock(args.host, args.port, options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "config file (default: $GATEWAY_CONFIG, else ./gateway.yaml)"
    s = sub.add_parser("serve", help="run the gateway", description="Run the gateway.")
    s.add_argument("--config", metavar="PATH", help=config_help)
    s.add_argument("--host", help="client listener's address (default: listen.host)")
    s.add_argument("--port", type=int, help="client listener's port (default: listen.port)")
    s.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes to run (default: 1)"
    )
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser(
        "demo",
        help="run the gateway in front of the built-in mock upstream",
        description="Run the mock upstream and the gateway in front of it, with two teams.",
    )
    d.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    d.add_argument(
        "--admin-port", type=int, default=9464, help="admin and metrics port (default: 9464)"
    )
    d.add_argument(
        "--state",
        metavar="DIR",
        default="gateway-demo-state",
        help="folder for the demo's config and ledger (default: ./gateway-demo-state)",
    )
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Print every problem of a config file; exit 0 if it is valid, 1 if not.",
    )
    c.add_argument("path", help="the config file")
    c.set_defaults(func=cmd_check_config)
    k = sub.add_parser("keys", help="client keys", description="Client keys.")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    kn = ksub.add_parser(
        "new",
        help="print a new client key and its sha256 line",
        description="Print a new client key (once) and the sha256 line for the config.",
    )
    kn.add_argument("--team", required=True, help="the team the key is for (required)")
    kn.set_defaults(func=cmd_keys_new)
    u = sub.add_parser(
        "usage",
        help="usage and cost report from the ledger",
        description="Usage and cost report from the ledger.",
    )
    u.add_argument("--config", metavar="PATH", help=config_help)
    when = "YYYY-MM-DD, an ISO-8601 time or unix seconds"
    u.add_argument("--since", metavar="TIME", help=f"from this time, {when} (default: no start)")
    u.add_argument("--until", metavar="TIME", help="before this time (default: no end)")
    u.add_argument(
        "--by",
        default="team,model",
        metavar="KEYS",
        help="group by any of team, model, day, user and tag:KEY (the value of tag KEY),"
        " comma-separated (default: team,model)",
    )
    u.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="report format (default: table)",
    )
    u.set_defaults(func=cmd_usage)
    cli_requests.add_parser(sub, config_help)
    cli_replay.add_parser(sub)
    m = sub.add_parser(
        "mock-upstream",
        help="a fake Responses-API provider",
        description="A Responses-API-compatible fake provider for demos, tests and benchmarks.",
    )
    m.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    m.add_argument("--port", type=int, default=8090, help="port (default: 8090)")
    m.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay before the first output, in ms (default: 0)",
    )
    m.add_argument(
        "--tokens-per-s",
        type=float,
        default=0.0,
        metavar="N",
        help="pace of streamed output, 0 for no pacing (default: 0)",
    )
    m.add_argument(
        "--refuse-key",
        action="append",
        default=[],
        metavar="KEY",
        help="answer requests with this upstream key 401 invalid_api_key; repeatable "
        "(default: none)",
    )
    m.add_argument(
        "--require-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept only these upstream keys, others get 401; repeatable (default: any key)",
    )
    m.add_argument(
        "--fail-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="fail this fraction of requests, 0 to 1, evenly spread (default: 0)",
    )
    m.add_argument(
        "--fail-status",
        default="503",
        metavar="KIND",
        help="how --fail-ratio fails: 400-599[:retry-after seconds], reset, close or "
        "cut[:events] (default: 503)",
    )
    m.set_defaults(func=cmd_mock)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

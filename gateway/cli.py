"""The `gateway` command: serve, demo, check-config, keys, usage, mock-upstream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import secrets
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiohttp import web

from gateway import backends, config
from gateway.admin import CONFIG_PATH
from gateway.app import create_admin_app, create_app, make_runner
from gateway.listener import LimitedSite
from gateway.runtime import Gateway
from gateway.telemetry.logging import configure_logging

STOP_GRACE = 2.0  # seconds a request still running after the drain gets before it is cancelled


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def run_gateway(
    settings: config.Settings,
    host: str,
    port: int,
    config_path: str | None = None,
    announce: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the config. A stop drains and flushes."""
    gw = Gateway(settings)
    app = create_app(gw)
    admin = create_admin_app(gw)
    if config_path:
        admin[CONFIG_PATH] = config_path
    # the drain happens before the runner stops (gw.drain): what is left by then is cut
    runner = make_runner(app, shutdown_timeout=STOP_GRACE)
    admin_runner = make_runner(admin, shutdown_timeout=5)
    await runner.setup()  # starts the Gateway (cleanup_ctx)
    await admin_runner.setup()
    site = LimitedSite(runner, host, port, max_connections=settings.limits.max_connections)
    await site.start()
    admin_site = web.TCPSite(admin_runner, settings.admin.host, settings.admin.port)
    await admin_site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        if config_path:
            gw.spawn(_reload(gw, config_path))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if announce:
        gw.log.info(
            "listening",
            url=f"http://{host}:{port}",
            admin=f"http://{settings.admin.host}:{settings.admin.port}",
        )
    await stop.wait()
    # both listeners stay open while requests in flight finish: /readyz answers 503 and new
    # requests 503 shutting_down, so a load balancer sees the drain and clients go elsewhere
    gw.draining = True
    drain = gw.settings.limits.drain_timeout  # as the last reload left it
    gw.log.info("draining", inflight=gw.inflight, timeout=drain)
    await gw.drain(drain)
    await runner.cleanup()  # closes the listener and what is left, then the Gateway
    await admin_runner.cleanup()


async def _reload(gw: Gateway, path: str) -> None:
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        gw.log.error("reload refused", problems=e.problems)
        return
    await gw.reload(settings)
    gw.log.info("reloaded", config=path)


def cmd_serve(args: argparse.Namespace) -> int:
    path = args.config or config.default_config_path()
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
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
    configure_logging(settings.telemetry.logs.level, settings.telemetry.logs.format)
    host = args.host or settings.listen.host
    port = args.port if args.port is not None else settings.listen.port
    _use_uvloop()
    asyncio.run(run_gateway(settings, host, port, path))
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
    from gateway.ledger.sqlite import SqliteLedger

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
    db = Path(settings.state.path) / "ledger.sqlite3"
    if not db.exists():
        print(f"gateway usage: no ledger at {db} yet", file=sys.stderr)
        return 1

    async def report() -> str:
        ledger = SqliteLedger(db)
        await ledger.start()
        try:
            rows = await ledger.report(since, until, by)
        finally:
            await ledger.close()
        return render(rows, by, args.format)

    print(asyncio.run(report()), end="")
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, run_mock

    run_mock(
        args.host, args.port, MockOptions(ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s)
    )
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_settings(
    mock_url: str,
    state_dir: str,
    keys: Mapping[str, str],
    admin_key: str,
    port: int,
    admin_port: int,
) -> config.Settings:
    text = (Path(__file__).parent / "demo.yaml").read_text()
    env = {
        "MOCK_URL": mock_url,
        "STATE_DIR": state_dir,
        "ADMIN_KEY": admin_key,
        "PORT": str(port),
        "ADMIN_PORT": str(admin_port),
        **keys,
    }
    return config.loads(text, env, "demo.yaml")


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, start_mock

    configure_logging("info", "console" if sys.stdout.isatty() else "json")
    _use_uvloop()
    keys = {
        "DEMO_SEARCH_KEY": "demo-search-" + secrets.token_hex(8),
        "DEMO_SUPPORT_KEY": "demo-support-" + secrets.token_hex(8),
    }
    admin_key = "demo-admin-" + secrets.token_hex(8)
    port = args.port or 8080
    admin_port = args.admin_port or 9464
    state_dir = args.state or str(Path.cwd() / "gateway-demo-state")

    async def main() -> None:
        runner, mock_port = await start_mock(
            "127.0.0.1", 0, MockOptions(ttft_ms=80, tokens_per_s=60)
        )
        settings = demo_settings(
            f"http://127.0.0.1:{mock_port}", state_dir, keys, admin_key, port, admin_port
        )
        base = f"http://127.0.0.1:{port}"
        print(
            _demo_banner(
                base,
                f"http://127.0.0.1:{admin_port}",
                keys,
                admin_key,
                f"http://127.0.0.1:{mock_port}",
            ),
            flush=True,
        )
        try:
            await run_gateway(settings, "127.0.0.1", port, announce=False)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return 0


def _demo_banner(base: str, admin: str, keys: Mapping[str, str], admin_key: str, mock: str) -> str:
    search, support = keys["DEMO_SEARCH_KEY"], keys["DEMO_SUPPORT_KEY"]
    return f"""
LLM gateway demo is running (Ctrl-C to stop)
  gateway        {base}/v1        (mock upstream behind it: {mock})
  admin/metrics  {admin}/metrics  {admin}/admin/teams
  team 'search'  key {search}   models: any, budget 20000 tokens/day
  team 'support' key {support}  models: garda-*, budget 5000 tokens/hour
  admin key      {admin_key}

Try it:
  curl -s {base}/v1/responses -H 'Authorization: Bearer {search}' \\
       -H 'content-type: application/json' \\
       -d '{{"model":"nusantara-base","input":"Say hello","max_output_tokens":32}}'
  curl -sN {base}/v1/responses -H 'Authorization: Bearer {search}' \\
       -H 'content-type: application/json' \\
       -d '{{"model":"nusantara-base","input":"Stream please","stream":true}}'
  curl -s {admin}/admin/teams -H 'Authorization: Bearer {admin_key}'

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{search}")
  print(client.responses.create(model="nusantara-base", input="Hello").output_text)
  PY
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="run the gateway in front of the built-in mock upstream")
    d.add_argument("--port", type=int, default=0)
    d.add_argument("--admin-port", type=int, default=0)
    d.add_argument("--state", help="directory for the demo's ledger")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("path")
    c.set_defaults(func=cmd_check_config)
    k = sub.add_parser("keys", help="client keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="print a new client key and its sha256 line")
    kn.add_argument("--team", required=True)
    kn.set_defaults(func=cmd_keys_new)
    u = sub.add_parser("usage", help="usage and cost report from the ledger")
    u.add_argument("--config")
    u.add_argument("--since")
    u.add_argument("--until")
    u.add_argument("--by", default="team,model")
    u.add_argument("--format", choices=("table", "csv", "json"), default="table")
    u.set_defaults(func=cmd_usage)
    m = sub.add_parser("mock-upstream", help="a fake Responses-API provider")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8090)
    m.add_argument("--ttft-ms", type=float, default=0.0)
    m.add_argument("--tokens-per-s", type=float, default=0.0)
    m.set_defaults(func=cmd_mock)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

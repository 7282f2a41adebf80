"""`gateway demo`: the mock upstream and the gateway in front of it, in one command.

The demo writes the config it runs to its state folder (client keys as hashes, the admin and
upstream keys by reference to the environment), so `gateway usage --config` reads its ledger,
and prints snippets that run as printed from the directory it was started in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from gateway import config
from gateway.cli_run import ListenError, run_gateway, use_uvloop
from gateway.telemetry.logging import configure_logging

ADMIN_KEY_VAR = "GATEWAY_DEMO_ADMIN_KEY"
UPSTREAM_KEY_VAR = "GATEWAY_DEMO_UPSTREAM_KEY"
CONFIG_NAME = "gateway.yaml"


class _Fill(Template):
    """`@{name}` fills the template; `${VAR}` is left to the config loader."""

    delimiter = "@"


@dataclass(frozen=True)
class DemoKeys:
    search: str
    support: str
    admin: str
    upstream: str

    @classmethod
    def fresh(cls) -> DemoKeys:
        return cls(
            search="demo-search-" + secrets.token_hex(8),
            support="demo-support-" + secrets.token_hex(8),
            admin="demo-admin-" + secrets.token_hex(8),
            upstream="demo-upstream-" + secrets.token_hex(8),
        )

    def env(self) -> dict[str, str]:
        """What the written config reads from the environment."""
        return {ADMIN_KEY_VAR: self.admin, UPSTREAM_KEY_VAR: self.upstream}


def config_text(mock_url: str, state_dir: Path, keys: DemoKeys, port: int, admin_port: int) -> str:
    """The demo's config file: no secret in it."""
    template = (Path(__file__).parent / "demo.yaml").read_text()
    return _Fill(template).substitute(
        port=port,
        admin_port=admin_port,
        mock_url=json.dumps(mock_url),
        state_dir=json.dumps(str(state_dir)),
        search_digest=hashlib.sha256(keys.search.encode()).hexdigest(),
        support_digest=hashlib.sha256(keys.support.encode()).hexdigest(),
    )


HEADER = "# The embedded demo:"  # the first line of every config the demo writes


class DemoError(Exception):
    """Why the demo cannot start, in one line."""


def write_config(path: Path, text: str) -> None:
    """Write the config through a new file moved into place: a link at `path` is replaced,
    never followed. A file there that the demo did not write is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not _ours(path)):
        raise DemoError(f"{path} exists and was not written by the demo; choose another --state")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gateway-demo-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ours(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def check_args(port: int, admin_port: int, state: str) -> None:
    for what, value in (("--port", port), ("--admin-port", admin_port)):
        if not 1 <= value <= 65535:
            raise DemoError(f"{what} {value}: must be a port number from 1 to 65535")
    if port == admin_port:
        raise DemoError(f"--port and --admin-port are both {port}: choose two ports")
    if "${" in state:  # the config would read it as a variable
        raise DemoError(f"--state {state!r}: a path with '${{' cannot be used; choose another")


def shown_path(path: Path) -> str:
    """A path as a shell snippet run from the current directory names it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        rel = str(path)
    shown = str(path) if rel.startswith("..") else rel
    if shown.startswith("-"):  # not an option to the command it follows
        shown = "./" + shown
    return shlex.quote(shown)


def commands() -> tuple[str, str]:
    """This Python and this `gateway`, as the snippets call them (`openai` is installed with
    the gateway's dev extra, as the README's first command does)."""
    python = Path(sys.executable)
    gateway = python.parent / "gateway"
    py = shown_path(python)
    return py, shown_path(gateway) if gateway.exists() else f"{py} -m gateway"


def banner(
    base: str, admin: str, keys: DemoKeys, mock: str, config_path: Path, python: str, gateway: str
) -> str:
    """What the demo prints: where everything is, then snippets that run as printed, each a
    block of its own after a `#` title line."""
    search, support = keys.search, keys.support
    return f"""
LLM gateway demo is running (Ctrl-C to stop)
  gateway        {base}/v1        (mock upstream behind it: {mock})
  admin/metrics  {admin}/metrics  {admin}/admin/teams
  team 'search'  key {search}   models: any, budget 20000 tokens/day
  team 'support' key {support}  models: garda-*, budget 5000 tokens/hour
  admin key      {keys.admin}
  config         {shown_path(config_path)}  (client keys as hashes, no secret in it)

Try it, from this directory in another terminal:

# a response
curl -s {base}/v1/responses -H 'Authorization: Bearer {search}' \\
  -H 'content-type: application/json' \\
  -d '{{"model":"nusantara-base","input":"Say hello","max_output_tokens":32}}'

# a streamed response
curl -sN {base}/v1/responses -H 'Authorization: Bearer {search}' \\
  -H 'content-type: application/json' \\
  -d '{{"model":"nusantara-base","input":"Stream please","stream":true}}'

# the teams' budgets
curl -s {admin}/admin/teams -H 'Authorization: Bearer {keys.admin}'

# the OpenAI SDK
{python} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{search}")
print(client.responses.create(model="nusantara-base", input="Hello").output_text)
PY

# the OpenAI SDK over one WebSocket (responses.connect)
{python} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{search}")
with client.responses.connect() as conn:
    for question in ("Hello", "And once more"):
        conn.send({{"type": "response.create", "model": "nusantara-base", "input": question}})
        for event in conn:
            if event.type == "error":
                raise SystemExit(event.error.message)
            if event.type == "response.completed":
                print(event.response.output_text)
                break
PY

# usage and cost from the ledger
{gateway} usage --config {shown_path(config_path)}
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, start_mock

    configure_logging("info", "console" if sys.stdout.isatty() else "json")
    keys = DemoKeys.fresh()
    port, admin_port = args.port, args.admin_port
    try:
        check_args(port, admin_port, args.state)
    except DemoError as e:
        print(f"gateway demo: {e}", file=sys.stderr)
        return 1
    state_dir = Path(args.state).absolute()
    config_path = state_dir / CONFIG_NAME
    python, gateway = commands()

    async def main() -> None:
        runner, mock_port = await start_mock(
            "127.0.0.1", 0, MockOptions(ttft_ms=80, tokens_per_s=60)
        )
        mock = f"http://127.0.0.1:{mock_port}"
        try:
            text = config_text(mock, state_dir, keys, port, admin_port)
            settings = config.loads(text, keys.env(), str(config_path))
            write_config(config_path, text)
            shown = banner(
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{admin_port}",
                keys,
                mock,
                config_path,
                python,
                gateway,
            )
            await run_gateway(
                settings, "127.0.0.1", port, announce=False, ready=lambda: print(shown, flush=True)
            )
        finally:
            await runner.cleanup()

    use_uvloop()
    try:
        asyncio.run(main())
    except ListenError as e:
        print(f"gateway demo: {e}; choose free ones with --port and --admin-port", file=sys.stderr)
        return 1
    except DemoError as e:
        print(f"gateway demo: {e}", file=sys.stderr)
        return 1
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    return 0

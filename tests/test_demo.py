"""`gateway demo` as a newcomer meets it: every snippet it prints runs as printed, the config
it ran is on disk for `gateway usage`, a taken port is one line, and `--help` explains."""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from gateway.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def start_demo(tmp_path: Path, port: int, admin_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--state",
            str(tmp_path / "demo-state"),
        ],
        cwd=REPO,  # the README's commands run from the repository root
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_banner(proc: subprocess.Popen[str], within: float = 30) -> str:
    """The banner up to its last snippet, within `within` seconds (read from the descriptor:
    a buffered reader would hide what it holds from `select`)."""
    assert proc.stdout is not None
    fd, out, deadline = proc.stdout.fileno(), b"", time.monotonic() + within
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not re.search(rb"# usage and cost from the ledger\n.*\n", out):
            assert sel.select(max(0.0, deadline - time.monotonic())), out
            chunk = os.read(fd, 65536)
            assert chunk, out
            out += chunk
    return out.decode()


def snippets(banner: str) -> dict[str, str]:
    """The blocks after "Try it": each starts with a `# title` line."""
    tail = banner.split("Try it", 1)[1].split("\n", 1)[1]
    blocks = [b.strip("\n") for b in tail.split("\n\n") if b.strip()]
    assert all(b.startswith("# ") for b in blocks), blocks
    return {b.split("\n", 1)[0][2:]: b for b in blocks}


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    proc = start_demo(tmp_path, free_port(), free_port())
    try:
        yield read_banner(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_every_printed_snippet_runs_verbatim_in_a_shell(demo: str, tmp_path: Path) -> None:
    found = snippets(demo)
    assert list(found) == [
        "a response",
        "a streamed response",
        "the teams' budgets",
        "the OpenAI SDK",
        "the OpenAI SDK over one WebSocket (responses.connect)",
        "usage and cost from the ledger",
    ]
    out: dict[str, str] = {}
    for title, block in found.items():
        done = subprocess.run(
            ["bash", "-c", block],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        )
        assert done.returncode == 0, (title, block, done.stdout, done.stderr)
        out[title] = done.stdout
    assert '"status":"completed"' in out["a response"]
    assert "event: response.completed" in out["a streamed response"]
    assert '"team":"search"' in out["the teams' budgets"]
    assert len(out["the OpenAI SDK"].split()) >= 3
    assert len(out["the OpenAI SDK over one WebSocket (responses.connect)"].splitlines()) == 2
    report = out["usage and cost from the ledger"].splitlines()
    assert report[0].split()[:3] == ["team", "model", "requests"]
    assert report[-1].startswith("TOTAL")


def test_the_written_config_is_the_one_run_and_holds_no_secret(demo: str, tmp_path: Path) -> None:
    written = (tmp_path / "demo-state" / "gateway.yaml").read_text()
    keys = set(re.findall(r"demo-(?:search|support|admin)-[0-9a-f]{16}", demo))
    assert len(keys) == 3
    for key in keys:
        assert key not in written
    assert "sha256:" in written and "${GATEWAY_DEMO_ADMIN_KEY:-}" in written
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check-config",
            str(tmp_path / "demo-state/gateway.yaml"),
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        check=False,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_taken_port_is_one_line_and_no_banner(tmp_path: Path, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        port, admin_port = (busy, free_port()) if taken == "listen" else (free_port(), busy)
        proc = start_demo(tmp_path, port, admin_port)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert stdout == ""  # no banner, no keys
    assert stderr.count("\n") == 1, stderr
    assert f"127.0.0.1:{busy} ({taken})" in stderr and "in use" in stderr, stderr


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path, mock_upstream_process: str) -> None:
    cfg = tmp_path / "gw.yaml"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        cfg.write_text(
            f"listen: {{host: 127.0.0.1, port: {busy}}}\n"
            f"admin: {{host: 127.0.0.1, port: {free_port()}}}\n"
            f'upstreams: {{mock: {{base_url: "{mock_upstream_process}"}}}}\n'
            'teams: {t: {keys: ["sha256:' + "0" * 64 + '"]}}\n'
            f"state: {{path: {tmp_path / 'state'}}}\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"gateway serve: cannot listen on 127.0.0.1:{busy} (listen): address already in use"
    ], done.stderr


def options(parser: argparse.ArgumentParser, path: str = "gateway") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_says_what_it_does_and_its_default() -> None:
    seen = 0
    for where, action in options(build_parser()):
        seen += 1
        text = action.help or ""
        assert text, (where, action.dest)
        if action.option_strings and not action.required:
            assert "(default: " in text, (where, action.option_strings, text)
    assert seen >= 16


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "demo", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "70000"], "--port 70000: must be a port number from 1 to 65535"),
        (["--port", "0"], "--port 0: must be a port number from 1 to 65535"),
        (["--port", "18555", "--admin-port", "18555"], "are both 18555"),
        (["--state", "a${HOME}b"], "a path with '${' cannot be used"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    done = run_demo(tmp_path, *args)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_a_config_the_demo_did_not_write_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "gateway.yaml"
    mine.write_text("# my own gateway\n")
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "gateway.yaml").symlink_to(target)
    for state in (".", "linked"):
        port, admin = str(free_port()), str(free_port())
        done = run_demo(tmp_path, "--state", state, "--port", port, "--admin-port", admin)
        assert done.returncode == 1 and done.stdout == "", done.stderr
        assert "was not written by the demo" in done.stderr and done.stderr.count("\n") == 1
    assert mine.read_text() == "# my own gateway\n" and target.read_text() == "keep me\n"


def test_a_state_path_that_starts_with_a_dash_is_shown_runnable(tmp_path: Path) -> None:
    from gateway.demo import shown_path

    here = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert shown_path(tmp_path / "-st" / "gateway.yaml") == "./-st/gateway.yaml"
        assert shown_path(tmp_path / "a b" / "x") == "'a b/x'"
    finally:
        os.chdir(here)

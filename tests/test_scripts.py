"""scripts/system-packages.sh says what it installs system-wide, and only installs as root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-packages.sh"


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run(
    tmp_path: Path,
    uid: int,
    apt: bool,
    prometheus: bool,
    chromium: bool = True,
    nginx: bool = True,
) -> tuple[str, list[str]]:
    """The script with `id`, `apt-get`, `prometheus`, `chromium`, `chromedriver` and `nginx`
    replaced by stubs that log their calls; nothing else on PATH but what a shell needs."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    stub(bin_dir, "id", f"echo {uid}")
    if apt:
        stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    if prometheus:
        stub(bin_dir, "prometheus", "exit 0")
    if chromium:
        stub(bin_dir, "chromium", "exit 0")
        stub(bin_dir, "chromedriver", "exit 0")
    if nginx:
        stub(bin_dir, "nginx", "exit 0")
    done = subprocess.run(
        ["/bin/bash", str(SCRIPT)],
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return done.stdout, calls


def test_as_root_it_says_it_installs_prometheus_then_does(tmp_path: Path) -> None:
    out, calls = run(tmp_path, uid=0, apt=True, prometheus=False)
    assert "installing Debian's prometheus package with apt-get (as root)" in out
    assert "where systemd runs, Debian starts its service on :9090" in out
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus",
    ]


@pytest.mark.parametrize(("uid", "apt", "says"), [(1000, True, "not root"), (0, False, "no apt")])
def test_otherwise_it_installs_nothing_and_says_why(
    tmp_path: Path, uid: int, apt: bool, says: str
) -> None:
    out, calls = run(tmp_path, uid=uid, apt=apt, prometheus=False)
    assert calls == []
    assert says in out and "the dashboard test will skip" in out


def test_nothing_to_do_when_prometheus_is_there(tmp_path: Path) -> None:
    assert run(tmp_path, uid=0, apt=True, prometheus=True) == ("", [])


def test_as_root_it_installs_chromium_for_the_browser_test(tmp_path: Path) -> None:
    out, calls = run(tmp_path, uid=0, apt=True, prometheus=False, chromium=False)
    assert "installing Debian's packages chromium chromium-driver with apt-get (as root)" in out
    assert "for the inspector's browser test" in out
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus",
        "apt-get install -y -qq --no-install-recommends chromium chromium-driver",
    ]
    (tmp_path / "user").mkdir()
    out, calls = run(tmp_path / "user", uid=1000, apt=True, prometheus=True, chromium=False)
    assert calls == [] and "the inspector's browser test will skip" in out


def test_as_root_it_installs_nginx_for_the_deploy_test(tmp_path: Path) -> None:
    out, calls = run(tmp_path, uid=0, apt=True, prometheus=True, nginx=False)
    assert "installing Debian's nginx package with apt-get (as root)" in out
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends nginx",
    ]

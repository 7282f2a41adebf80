#!/usr/bin/env bash
# Sets everything up from scratch and runs the checks: lint, types, tests. Installs the package
# and its dev extra into .venv; as root on Debian also Debian's prometheus (scripts/system-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# as root on Debian: apt-get installs prometheus (it says so); elsewhere nothing system-wide
bash scripts/system-packages.sh
.venv/bin/ruff check gateway tests bench
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Sets everything up from scratch and runs the checks: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# the Prometheus end-to-end test needs the real server; it skips with a reason without it
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) \
    || echo "note: could not install prometheus; its end-to-end test will skip"
fi
.venv/bin/ruff check gateway tests bench
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"

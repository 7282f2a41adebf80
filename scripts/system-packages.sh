#!/usr/bin/env bash
# The system packages the test suite can use, installed only where that is possible and said:
# Debian's `prometheus` (the dashboard test runs a real one), with apt-get, which needs root.
# Anywhere else nothing is installed and the tests that need it skip with their reason.
set -uo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get: prometheus is not installed; the dashboard test will skip"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "note: not root: prometheus is not installed (apt-get needs root); the dashboard test will skip"
  exit 0
fi
echo "installing Debian's prometheus package with apt-get (as root), for the dashboard test;" \
  "where systemd runs, Debian starts its service on :9090"
if ! (apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null); then
  echo "note: could not install prometheus; the dashboard test will skip"
fi
exit 0

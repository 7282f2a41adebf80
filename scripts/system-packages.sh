#!/usr/bin/env bash
# The system packages the test suite can use, installed only where that is possible and said:
# Debian's `prometheus` (the dashboard test runs a real one), `chromium` with `chromium-driver`
# (the inspector's browser test drives a headless one) and `nginx` (the deploy test balances two
# replicas with it), with apt-get, which needs root. Anywhere else nothing is installed and the tests that need them skip with their
# reason.
set -uo pipefail
updated=""

# install FOR NOTE PACKAGE...: apt-get install PACKAGE... for the test FOR, saying so first
install() {
  local for="$1" note="$2" what
  shift 2
  what="$*"
  if [ "$#" = 1 ]; then what="$* package"; else what="packages $*"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get: $* not installed; $for will skip"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "note: not root: $* not installed (apt-get needs root); $for will skip"
    return
  fi
  echo "installing Debian's $what with apt-get (as root), for $for$note"
  if [ -z "$updated" ]; then
    apt-get update -qq && updated=yes
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null; then
    echo "note: could not install $*; $for will skip"
  fi
}

if ! command -v prometheus >/dev/null 2>&1; then
  install "the dashboard test" "; where systemd runs, Debian starts its service on :9090" \
    prometheus
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  install "the inspector's browser test" "" chromium chromium-driver
fi
if ! command -v nginx >/dev/null 2>&1; then
  install "the deploy test's load balancer" "" nginx
fi
exit 0

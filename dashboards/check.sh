#!/bin/sh
# Validate the dashboards and alerting config:
#   - the Grafana dashboard and provisioning files parse (JSON / YAML);
#   - promtool check rules, test rules (alerts_test.yml) and check config, when promtool exists.
# Usage: dashboards/check.sh   (from anywhere; exit status non-zero on the first failure)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

echo "checking $here/grafana/llm-gateway.json"
"$python" - "$here/grafana/llm-gateway.json" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    d = json.load(f)
panels = [p for p in d["panels"] if p.get("type") != "row"]
empty = [p["title"] for p in panels if not p.get("targets")]
if empty:
    sys.exit(f"panels without a query: {empty}")
print(f"  SUCCESS: {len(panels)} panels, schemaVersion {d['schemaVersion']}")
PY

for f in "$here"/grafana/provisioning/*/*.yaml; do
    echo "checking $f"
    "$python" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1])); print("  SUCCESS")' "$f"
done

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found: skipping the Prometheus checks (apt-get install prometheus, or"
    echo "download it from https://prometheus.io/download/)"
    exit 0
fi
promtool check rules "$here/prometheus/alerts.yml"
promtool test rules "$here/prometheus/alerts_test.yml"
promtool check config "$here/prometheus/prometheus.yml"
# the compose stack's config, with the rules where the container mounts them
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$root/deploy/prometheus.yml" "$here/prometheus/alerts.yml" "$tmp/"
promtool check config "$tmp/prometheus.yml"

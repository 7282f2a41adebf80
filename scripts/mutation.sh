#!/usr/bin/env bash
# Mutation testing of the pure money-and-protocol modules: every small change mutmut makes to
# them must fail a test. Prints the score of each module and the mutants that survived, and
# exits non-zero when a module scores below MIN_SCORE (default 95). Not part of CI: it takes
# about three minutes on two cores, one more the first time (to build its venv).
#
# What is mutated and which tests run: [tool.mutmut] in pyproject.toml. Survivors that change
# nothing observable are explained in scripts/mutation-survivors.md, with the scores.
#
#   scripts/mutation.sh                 # a fresh run, then the report
#   scripts/mutation.sh 'gateway.sse.*'  # only the mutants whose names match
#   scripts/mutation.sh --report        # the report of the last run only
#   JOBS=1 MIN_SCORE=90 scripts/mutation.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-mutation  # its own: mutmut is not a dependency of the project or of CI
MUTMUT_VERSION=3.8.1

if [ "${1:-}" != "--report" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' "mutmut==$MUTMUT_VERSION"
  rm -rf mutants  # no results carried over from an earlier run of other code or tests
  started=$(date +%s)
  # its progress line is redrawn thousands of times: keep the log, show its tail on failure
  if ! "$VENV/bin/mutmut" run --max-children "${JOBS:-$(nproc)}" "$@" >mutants.log 2>&1; then
    tail -n 40 mutants.log
    echo "mutmut run failed; the whole log is in mutants.log" >&2
    exit 1
  fi
  mv mutants.log mutants/run.log
  echo "mutmut ran for $(($(date +%s) - started)) s"
fi

"$VENV/bin/mutmut" results --all true >mutants/results.txt
MIN_SCORE="${MIN_SCORE:-95}" "$VENV/bin/python" - <<'EOF'
"""Per-module scores and the survivors, from `mutmut results --all true`."""

import os
import re
import subprocess
import sys
from collections import Counter, defaultdict

# mutmut's names: gateway.budget.windows.x_window_bounds__mutmut_7 (a function) or
# gateway.sse.xǁSSEDecoderǁfeed__mutmut_3 (a method)
LINE = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x[_ǁ]\S+__mutmut_\d+): (?P<status>.+)$")
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}

by_module: dict[str, Counter[str]] = defaultdict(Counter)
survivors: dict[str, list[str]] = defaultdict(list)
with open("mutants/results.txt", encoding="utf-8") as f:
    for line in f:
        m = LINE.match(line)
        if not m:
            continue
        module, status = m["module"], m["status"].strip()
        if status == "not checked":  # a run of some modules only (a pattern was given)
            continue
        by_module[module][status] += 1
        if status not in DETECTED:
            survivors[module].append(f"{m['name']} ({status})")

if not by_module:
    sys.exit("no mutants found: run scripts/mutation.sh first")

minimum = float(os.environ["MIN_SCORE"])
low = []
print(f"\n{'module':32} {'mutants':>8} {'killed':>8} {'left':>6} {'score':>8}")
total = Counter[str]()
for module in sorted(by_module):
    counts = by_module[module]
    total += counts
    n, killed = sum(counts.values()), sum(counts[s] for s in DETECTED)
    score = 100 * killed / n
    low += [module] if score < minimum else []
    print(f"{module:32} {n:8} {killed:8} {n - killed:6} {score:7.1f}%")
n, killed = sum(total.values()), sum(total[s] for s in DETECTED)
print(f"{'all':32} {n:8} {killed:8} {n - killed:6} {100 * killed / n:7.1f}%")
print("statuses:", ", ".join(f"{s} {c}" for s, c in sorted(total.items())))

for module in sorted(survivors):
    print(f"\n== survivors in {module}")
    for name in survivors[module]:
        diff = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", name.split(" ")[0]],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        changed = [
            d for d in diff.splitlines() if d[:1] in "+-" and d[:3] not in ("+++", "---")
        ]
        print(f"  {name}")
        for d in changed:
            print(f"      {d.strip()}")

if low:
    print(f"\nbelow {minimum:g}%: {', '.join(low)}")
    sys.exit(1)
EOF

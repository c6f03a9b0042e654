#!/usr/bin/env bash
# The test sequence, run by README command 2 and by CI (.ci/run), after scripts/setup.sh:
# lint, then the quick tier (unit tests, about 2 minutes on 2 cores), then the slow tier (bundles
# end to end in subprocesses). Stops at the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff check ."
python3 -m ruff check .

# pytest exits 5 when it collects no test (a wrong path or marker): that is an error here, with a
# message, never a silent pass or an unexplained failure.
tier() {
  local name=$1
  shift
  echo "== $name tier: python3 -m pytest -q $*"
  local rc=0
  python3 -m pytest -q "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "error: the $name tier collected no tests (pytest exit code 5)" >&2
    return 1
  fi
  return "$rc"
}

tier quick -m "not slow" tests
# the slowest tests are listed, to keep the 30-minute CI budget in view as bundles are added
tier slow -m slow --durations=20 tests

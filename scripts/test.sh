#!/usr/bin/env bash
# The whole test suite: sets up .venv (scripts/setup_env.sh) and runs pytest. Extra arguments go
# to pytest (e.g. `bash scripts/test.sh -k geometry`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$status"

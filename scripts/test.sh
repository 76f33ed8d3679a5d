#!/usr/bin/env bash
# The test suite: sets up .venv (scripts/setup_env.sh) and runs pytest.
#   bash scripts/test.sh            everything (what CI runs: .ci/run); lists the 25 slowest tests
#   bash scripts/test.sh --fast     the fast tier: leaves out the tests marked `slow` (training a
#                                   model, DDP, real-data conversions, end-to-end evaluation)
# Other arguments go to pytest (e.g. `bash scripts/test.sh -k geometry`, `--fast -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not slow")
  else
    args+=("$arg")
  fi
done
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
set +e
python -m pytest --durations=25 ${args[@]+"${args[@]}"}
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$status"

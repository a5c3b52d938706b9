#!/usr/bin/env bash
# The README's test command: set up what is missing, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
exec node scripts/run-tests.mjs "$@"

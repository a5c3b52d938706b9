#!/usr/bin/env bash
# Makes the dashboard's screenshots in docs/ (docs/ui-*.png, shown in the
# README) with the dashboard's browser test on a real three-node cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
npx tsc -p .
UKAI_UI_SCREENSHOTS="$PWD/docs" node scripts/run-tests.mjs dist/test/ui.test.js

#!/usr/bin/env bash
# The test suite: fetch the default models, build the text-to-SQL data and the Python venv with
# the official `openai` client (all idempotent), then run every test once,
# in one build (dev profile with optimised dependencies). Then the aarch64 (NEON) kernel tests
# under qemu-user (scripts/test-aarch64.sh; said loudly and skipped if its tools cannot be
# installed; FLYWHEEL_AARCH64=skip skips it, =required makes it mandatory). Tests that could not
# run on this CPU are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
scripts/prepare-sql-data.sh
scripts/setup-test-client.sh
# Tests that cannot run here (a CPU without the feature they test) can only pass in cargo's
# harness; they append a line to this file instead, and the count is printed at the end.
export FLYWHEEL_SKIP_LOG="${FLYWHEEL_SKIP_LOG:-$(mktemp -t flywheel-skipped.XXXXXX)}"
: > "$FLYWHEEL_SKIP_LOG"
cargo test --workspace --locked "$@"
FLYWHEEL_AARCH64="${FLYWHEEL_AARCH64:-auto}" scripts/test-aarch64.sh
if [ -s "$FLYWHEEL_SKIP_LOG" ]; then
    echo "test.sh: $(wc -l < "$FLYWHEEL_SKIP_LOG") test(s) could not run on this machine (cargo counted them as passed):"
    sed 's/^/  skipped: /' "$FLYWHEEL_SKIP_LOG"
else
    echo "test.sh: every test ran; none was skipped at run time"
fi
rm -f "$FLYWHEEL_SKIP_LOG"

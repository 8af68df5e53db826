#!/usr/bin/env bash
# The test suite: fetch the default models, build the text-to-SQL data and the Python venv with
# the official `openai` client (all idempotent), then run every test once,
# in one build (dev profile with optimised dependencies). Then the aarch64 (NEON) kernel tests
# under qemu-user (scripts/test-aarch64.sh; said loudly and skipped if its tools cannot be
# installed; FLYWHEEL_AARCH64=skip skips it, =required makes it mandatory).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
scripts/prepare-sql-data.sh
scripts/setup-test-client.sh
cargo test --workspace --locked "$@"
FLYWHEEL_AARCH64="${FLYWHEEL_AARCH64:-auto}" scripts/test-aarch64.sh

#!/usr/bin/env bash
# The test suite: fetch the default models, build the text-to-SQL data and the Python venv with
# the official `openai` client (all idempotent), then run every test once,
# in one build (dev profile with optimised dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
scripts/prepare-sql-data.sh
scripts/setup-test-client.sh
cargo test --workspace --locked "$@"

#!/usr/bin/env bash
# The test suite: fetch the default models and build the text-to-SQL data (both idempotent,
# checksummed), then run every test once,
# in one build (dev profile with optimised dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
scripts/prepare-sql-data.sh
cargo test --workspace --locked "$@"

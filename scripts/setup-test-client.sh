#!/usr/bin/env bash
# setup-test-client.sh — create the Python venv with the official OpenAI client, used by
# tests/fixtures/openai_client_check.py to check `flywheel serve` against the real SDK.
#
#   openai 3.54.0 (pulls httpx, pydantic, ...)
#   jsonschema 4.23.0 (an independent validator for the structured-output property check)
#
# Venv: <repo>/.venv-client (git-ignored). Idempotent: nothing is installed when openai is
# already there at the pinned version.
#
# Usage:  bash scripts/setup-test-client.sh
# Env:    PYTHON=python3 (interpreter to build the venv from)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-client"
PYTHON="${PYTHON:-python3}"
OPENAI_VERSION="3.54.0"

log() { printf '[setup-test-client] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

have="$("$PY" -c "import importlib.metadata as m
try: print(m.version('openai'))
except m.PackageNotFoundError: pass")"
if [ "$have" = "$OPENAI_VERSION" ]; then
    log "openai $OPENAI_VERSION already installed"
else
    log "installing openai==$OPENAI_VERSION${have:+ (found $have)}"
    "$PY" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi
JSONSCHEMA_VERSION="4.23.0"
have="$("$PY" -c "import importlib.metadata as m
try: print(m.version('jsonschema'))
except m.PackageNotFoundError: pass")"
if [ "$have" != "$JSONSCHEMA_VERSION" ]; then
    log "installing jsonschema==$JSONSCHEMA_VERSION${have:+ (found $have)}"
    "$PY" -m pip install --quiet --disable-pip-version-check "jsonschema==$JSONSCHEMA_VERSION"
fi
"$PY" -c "import openai, jsonschema; print('[setup-test-client] openai', openai.__version__, 'and jsonschema ready: $PY')"

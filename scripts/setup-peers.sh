#!/usr/bin/env bash
# setup-peers.sh — create the Python venv with the *peer* implementations that
# flywheel is compared against (fixtures + benchmarks):
#
#   llama-cpp-python 0.3.36  (built from source with llama.cpp's native CPU
#                             defaults, i.e. GGML_NATIVE=ON: a fair, fast peer;
#                             only AMX is disabled, it SIGILLs on these VMs)
#   sentence-transformers    (with torch: CPU-only wheel index if reachable,
#                             otherwise plain `torch` from PyPI)
#   peft                     (LoRA training peer, with transformers)
#   llama-cpp-python[server] extras (uvicorn, fastapi, sse-starlette,
#                             starlette-context, pydantic-settings) for
#                             `python -m llama_cpp.server` (scripts/bench-serve.sh)
#   numpy, psutil, httpx (load generator for scripts/bench-serve.sh), gguf
#                             (writes the random K-quant benchmark model)
#
# Venv: <repo>/.venv-peers (git-ignored). Idempotent: packages already present
# at the wanted version are not reinstalled.
#
# Usage:  bash scripts/setup-peers.sh
# Env:    PYTHON=python3 (interpreter to build the venv from)
#         PEERS_JOBS=2   (parallel compile jobs for llama.cpp)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-peers"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
JOBS="${PEERS_JOBS:-2}"

log() { printf '[setup-peers] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
else
    log "venv $VENV already exists"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

# have NAME [VERSION] -> 0 if installed (at VERSION if given)
have() {
    local v
    v="$("$PY" -c "import importlib.metadata as m,sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1")"
    [ -n "$v" ] && { [ -z "${2:-}" ] || [ "$v" = "$2" ]; }
}

# --- small pure deps --------------------------------------------------------
for pkg in numpy psutil httpx gguf; do
    if have "$pkg"; then
        log "$pkg already installed"
    else
        log "installing $pkg"
        "${PIP[@]}" install --quiet "$pkg"
    fi
done

# --- torch (CPU) ------------------------------------------------------------
if have torch; then
    log "torch already installed ($("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))'))"
else
    CPU_INDEX="https://download.pytorch.org/whl/cpu"
    if curl -s -m 10 -o /dev/null "$CPU_INDEX/"; then
        log "installing CPU-only torch from $CPU_INDEX"
        "${PIP[@]}" install --quiet torch --index-url "$CPU_INDEX"
    else
        log "CPU-only torch index unreachable; installing plain torch from PyPI (pulls CUDA libs; large)"
        "${PIP[@]}" install --quiet torch
    fi
fi

# --- sentence-transformers --------------------------------------------------
if have sentence-transformers; then
    log "sentence-transformers already installed"
else
    log "installing sentence-transformers"
    "${PIP[@]}" install --quiet sentence-transformers
fi

# --- PEFT (LoRA training peer for scripts/bench-train.sh) ---------------------
if have peft; then
    log "peft already installed"
else
    log "installing peft"
    "${PIP[@]}" install --quiet "peft>=0.18" safetensors
fi

# --- llama-cpp-python (source build, native CPU flags minus AMX) -----------
# llama.cpp's default GGML_NATIVE=ON compiles with -march=native. On this
# workplace's VMs the CPU advertises AMX (amx_tile/amx_int8/amx_bf16) but AMX
# tile instructions raise SIGILL at run time (seen: `tilezero` in
# ggml_backend_amx_mul_mat), so AMX is switched off with -mno-amx-*. These
# flags win over -march=native in GCC whatever their order. Everything else
# (AVX2/AVX-512/VNNI/...) stays native.
LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
MARKER="$VENV/.llama-cpp-python-build"
WANT_MARKER="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION CFLAGS=$LLAMA_CFLAGS"
if have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION" && [ "$(cat "$MARKER" 2>/dev/null)" = "$WANT_MARKER" ]; then
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already installed ($(cat "$MARKER"))"
else
    log "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from source (~20 min on 2 cores; nice -n 10, $JOBS jobs; native CPU defaults, CFLAGS='$LLAMA_CFLAGS')"
    # No CMAKE_ARGS: keep llama.cpp's defaults (GGML_NATIVE=ON etc.).
    env -u CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        CFLAGS="${CFLAGS:-} $LLAMA_CFLAGS" CXXFLAGS="${CXXFLAGS:-} $LLAMA_CFLAGS" \
        nice -n 10 "${PIP[@]}" install --no-binary llama-cpp-python --no-cache-dir \
        --force-reinstall --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    # deps (diskcache, jinja2, ...) — --no-deps above avoids reinstalling numpy
    "${PIP[@]}" install --quiet "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    echo "$WANT_MARKER" > "$MARKER"
fi

# --- llama-cpp-python[server] extras (OpenAI-compatible peer server) ---------
# --only-binary keeps pip from ever rebuilding llama-cpp-python here: it is
# already installed at the pinned version, so only the extra deps are added.
SERVER_DEPS=(uvicorn fastapi sse-starlette starlette-context pydantic-settings)
missing=0
for pkg in "${SERVER_DEPS[@]}"; do have "$pkg" || missing=1; done
if [ "$missing" = 0 ]; then
    log "llama-cpp-python[server] extras already installed"
else
    log "installing llama-cpp-python[server] extras"
    "${PIP[@]}" install --quiet --only-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi

log "installed versions:"
"$PY" - <<'EOF'
import importlib.metadata as m
for p in ("llama_cpp_python", "sentence-transformers", "torch", "transformers", "peft", "numpy", "psutil",
          "gguf", "httpx", "uvicorn", "fastapi", "sse-starlette", "starlette-context", "pydantic-settings"):
    try:
        print(f"  {p:22s} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"  {p:22s} MISSING")
EOF
log "done: use $VENV/bin/python"

#!/usr/bin/env bash
# LoRA training benchmark: flywheel (GGUF base in place, and a dense f32 base) vs Hugging Face
# PEFT + transformers (PyTorch, CPU, fp32) on the same model, data, rank and steps, interleaved.
# Prints tokens/s and peak RSS with ratios. Needs scripts/setup-peers.sh (peft is installed there).
# Usage: scripts/bench-train.sh [--steps N] [--repeats N] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh >/dev/null
cargo build --release --locked -p flywheel >/dev/null
.venv-peers/bin/python -c "import peft, transformers, psutil" 2>/dev/null \
    || { echo "peer environment missing: run scripts/setup-peers.sh" >&2; exit 1; }
exec .venv-peers/bin/python scripts/bench/train_bench.py "$@"

#!/usr/bin/env bash
# The flagship text-to-SQL ladder (evals/sql-ladder.toml) end to end, resumable: run it again
# after an interruption and it goes on where it stopped. Ctrl-C during training saves a
# checkpoint (resumed with --resume); the eval keeps every answered question.
#
#   1. recipes/sql.toml      -> runs/sql/adapter       (LoRA on the SQL training split)
#   2. make-data             -> data/sql/{train,valid}-rag.jsonl (prompts with retrieved examples)
#   3. recipes/sql-rag.toml  -> runs/sql-rag/adapter   (LoRA trained with retrieved examples)
#   4. eval run              -> runs/sql-ladder/{report.md,report.html,ladder.png,results.jsonl}
#
# On 2 CPU cores each adapter takes about 3 hours (Qwen2.5-Coder-0.5B at ~38 tok/s with gradient
# checkpointing, 2 epochs of 211K tokens) and the eval several more; on a GPU, set
# device = "cuda" and dtype = "bf16" in the recipes and device = "cuda" in the spec.
# --short runs the session-sized ladder instead (about 2.75 hours on 2 CPU cores): both adapters
# for 24 steps (recipes/sql-short.toml, recipes/sql-rag-short.toml) and evals/sql-ladder-short.toml,
# all eight rungs on a uniform random sample of 136 held-out questions.
# Usage: scripts/flagship.sh [--short] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=()
SUFFIX=""
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) THREADS=(--threads "$2"); shift 2 ;;
        --short) SUFFIX="-short"; shift ;;
        -h|--help) sed -n 2,17p "$0"; exit 0 ;;
        *) echo "flagship: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

FW=target/release/flywheel
bash scripts/fetch-models.sh >/dev/null
bash scripts/prepare-sql-data.sh >/dev/null
cargo build --release --locked -p flywheel >/dev/null

# Trains a recipe unless its run is finished (the adapter is written only after the last step;
# an interrupted run writes summary.json too); resumes from the newest checkpoint when there is one.
train() {
    local recipe=$1 dir=$2
    if [ -f "$dir/adapter/adapter_model.safetensors" ]; then
        echo "flagship: $recipe already trained ($dir/adapter)" >&2
    elif compgen -G "$dir/checkpoints/step-*" >/dev/null; then
        echo "flagship: resuming $recipe" >&2
        "$FW" lora-train "$recipe" --resume "${THREADS[@]}"
    else
        echo "flagship: training $recipe" >&2
        "$FW" lora-train "$recipe" "${THREADS[@]}"
    fi
    # Ctrl-C stops training cleanly (exit 0, a checkpoint saved): stop here, not in the eval.
    if [ ! -f "$dir/adapter/adapter_model.safetensors" ]; then
        echo "flagship: $recipe stopped before its last step; run this script again to resume" >&2
        exit 130
    fi
}

train "recipes/sql$SUFFIX.toml" "runs/sql$SUFFIX"
for split in train valid; do
    out=data/sql/$split-rag.jsonl
    if [ ! -f "$out" ]; then
        echo "flagship: writing $out" >&2
        "$FW" eval make-data "evals/sql-ladder$SUFFIX.toml" --rung "few-shot retrieved by question" \
            --input "data/sql/$split.jsonl" --out "$out.tmp"
        mv "$out.tmp" "$out"
    fi
done
train "recipes/sql-rag$SUFFIX.toml" "runs/sql-rag$SUFFIX"
"$FW" eval run "evals/sql-ladder$SUFFIX.toml" "${THREADS[@]}"

#!/usr/bin/env bash
# A/B speed check of two flywheel binaries (e.g. before and after a refactor), interleaved in one
# run: `flywheel bench` (prefill and decode tok/s) on each model, and LoRA training tokens/s on
# one epoch of recipes/quickstart.toml. Prints medians and the ratio B/A (> 1: B is faster).
#
#   scripts/bench-ab.sh A_BINARY B_BINARY [--rounds N] [--models "smollm2-135m-instruct ..."]
#                       [--threads N] [--no-train]
#
# Run on a quiet machine: two builds or benchmarks at once fight over the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] || { echo "usage: $0 A_BINARY B_BINARY [--rounds N] [--models LIST] [--threads N] [--no-train]" >&2; exit 2; }
A="$1"; B="$2"; shift 2
ROUNDS=3
MODELS="smollm2-135m-instruct qwen2.5-coder-0.5b-instruct"
THREADS=2
TRAIN=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --no-train) TRAIN=0; shift ;;
        *) echo "bench-ab: unknown option $1" >&2; exit 2 ;;
    esac
done
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "bench-ab: $bin is not an executable" >&2; exit 2; }
done
for m in $MODELS; do
    [ -e "models/$m" ] || { echo "bench-ab: models/$m is missing: run scripts/fetch-models.sh" >&2; exit 2; }
done

OUT="$(mktemp -d -t flywheel-ab.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
echo "bench-ab: A=$A B=$B rounds=$ROUNDS threads=$THREADS models=[$MODELS]" >&2

for r in $(seq 1 "$ROUNDS"); do
    for m in $MODELS; do
        for side in A B; do
            bin="$A"; [ "$side" = B ] && bin="$B"
            "$bin" bench --model "models/$m" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 \
                | sed "s/^/$side $m /" >> "$OUT/gen.txt"
        done
    done
    if [ "$TRAIN" = 1 ]; then
        for side in A B; do
            bin="$A"; [ "$side" = B ] && bin="$B"
            dir="$OUT/train-$side-$r"
            sed -e "s|^dir = .*|dir = \"$dir\"|" -e 's|^epochs = .*|epochs = 1|' \
                -e 's|^every = 10|every = 1000|' recipes/quickstart.toml > "$OUT/recipe.toml"
            "$bin" lora-train "$OUT/recipe.toml" --threads "$THREADS" \
                > /dev/null 2>&1 || { echo "bench-ab: training with $bin failed" >&2; exit 1; }
            python3 - "$dir/metrics.jsonl" "$side" >> "$OUT/train.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
# The first step includes warm-up (allocation, first-touch of the weights); leave it out.
tps = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
print(sys.argv[2], statistics.median(tps))
PY
        done
    fi
    echo "bench-ab: round $r/$ROUNDS done" >&2
done

python3 - "$OUT/gen.txt" "$OUT/train.txt" <<'PY'
import json, statistics, sys
from collections import defaultdict
gen = defaultdict(list)
for line in open(sys.argv[1]):
    side, model, js = line.split(" ", 2)
    v = json.loads(js)
    for key in ("prefill_tok_s", "decode_tok_s"):
        if key in v:
            gen[(model, key, side)].append(v[key])
print(f"{'what':<44} {'A':>10} {'B':>10} {'B/A':>7}")
for (model, key) in sorted({(m, k) for (m, k, _) in gen}):
    a = statistics.median(gen[(model, key, "A")])
    b = statistics.median(gen[(model, key, "B")])
    print(f"{model + ' ' + key:<44} {a:>10.1f} {b:>10.1f} {b / a:>7.3f}")
try:
    tr = defaultdict(list)
    for line in open(sys.argv[2]):
        side, v = line.split()
        tr[side].append(float(v))
    a, b = statistics.median(tr["A"]), statistics.median(tr["B"])
    print(f"{'LoRA training tokens/s (quickstart, 1 epoch)':<44} {a:>10.1f} {b:>10.1f} {b / a:>7.3f}")
except FileNotFoundError:
    pass
PY

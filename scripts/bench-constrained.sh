#!/usr/bin/env bash
# Decode speed with and without a grammar, interleaved in one run, for each model:
#   free     — greedy, 128 tokens at most;
#   regex    — the same prompt under `(.|\n)*` (every token allowed: the per-token check only);
#   schema   — a JSON Schema with a long string field (the mask is computed whenever the model's
#              greedy token is refused, e.g. at every quote and brace).
# Prints the median decode tok/s of each and the ratio to free (target: >= 0.90).
#
#   scripts/bench-constrained.sh [FLYWHEEL_BINARY] [--rounds N] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/flywheel}"
shift || true
ROUNDS=3
THREADS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        *) echo "bench-constrained: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -x "$BIN" ] || { echo "bench-constrained: $BIN is not an executable (cargo build --release -p flywheel)" >&2; exit 2; }
OUT="$(mktemp -d -t flywheel-constrained.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
cat > "$OUT/schema.json" <<'JSON'
{"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
 "story": {"type": "string", "maxLength": 600}}, "required": ["title", "story"],
 "additionalProperties": false}
JSON
PROMPT="Write a long story about a lighthouse keeper, as JSON with a title and the story."
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
    [ -e "models/$m" ] || { echo "bench-constrained: models/$m is missing: run scripts/fetch-models.sh" >&2; exit 2; }
    for r in $(seq 1 "$ROUNDS"); do
        for kind in free regex schema; do
            extra=()
            case "$kind" in
                regex) extra=(--regex '(.|\n)*') ;;
                schema) extra=(--json-schema "$OUT/schema.json") ;;
            esac
            "$BIN" generate --model "models/$m" --chat --temperature 0 --max-tokens 128 \
                --threads "$THREADS" --prompt "$PROMPT" --json "${extra[@]}" \
                | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], v["decode_tok_s"], v["usage"]["completion_tokens"])' "$m" "$kind" \
                >> "$OUT/runs.txt"
        done
    done
done
python3 - "$OUT/runs.txt" <<'PY'
import statistics, sys
from collections import defaultdict
tps, toks = defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    m, kind, v, n = line.split()
    tps[(m, kind)].append(float(v)); toks[(m, kind)].append(int(n))
print(f"{'model':<30} {'kind':<7} {'decode tok/s':>12} {'tokens':>7} {'vs free':>8}")
for m in sorted({m for m, _ in tps}):
    free = statistics.median(tps[(m, "free")])
    for kind in ("free", "regex", "schema"):
        v = statistics.median(tps[(m, kind)])
        print(f"{m:<30} {kind:<7} {v:>12.1f} {statistics.median(toks[(m, kind)]):>7} {v / free:>8.3f}")
PY

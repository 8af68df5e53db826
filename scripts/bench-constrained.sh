#!/usr/bin/env bash
# Decode speed with and without a grammar, interleaved in one run, for each model:
#   free     — greedy, 128 tokens at most;
#   regex    — the same prompt under `(.|\n)*` (every token allowed: the per-token check only);
#   schema   — a JSON Schema with a long string field (300 to 600 characters; the mask is
#              computed whenever the model's greedy token is refused, e.g. at quotes and braces).
# Prints the median decode tok/s of each and the ratio to free (target: >= 0.90).
# Then batch 1 and batch 8 (`flywheel bench --batch-size`, a 64-token prompt, 128 tokens, every
# row under the schema or none), and llama.cpp's grammar path as the peer (llama-cpp-python's
# `LlamaGrammar.from_json_schema`, same GGUF, prompt and schema; needs scripts/setup-peers.sh):
# flywheel's constrained decode tok/s over llama.cpp's (target: >= 1.5).
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
 "story": {"type": "string", "minLength": 300, "maxLength": 600}}, "required": ["title", "story"],
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
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
    for r in $(seq 1 "$ROUNDS"); do
        for b in 1 8; do
            for kind in free schema; do
                extra=()
                [ "$kind" = schema ] && extra=(--json-schema "$OUT/schema.json")
                "$BIN" bench --model "models/$m" --threads "$THREADS" --prompt-tokens 64 \
                    --gen-tokens 128 --repeats 1 --batch-size "$b" "${extra[@]}" \
                    | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], v["decode_tok_s"], v["generated_tokens"])' "$m" "b$b-$kind" \
                    >> "$OUT/batch.txt"
            done
        done
    done
    if [ -x .venv-peers/bin/python ]; then
        gguf="$(ls models/$m/*.gguf | head -1)"
        .venv-peers/bin/python scripts/bench/peer_llamacpp_grammar.py --model "$gguf" \
            --schema "$OUT/schema.json" --prompt "$PROMPT" --threads "$THREADS" --repeats "$ROUNDS" \
            | python3 -c 'import json,sys
for l in sys.stdin:
    v=json.loads(l); print(sys.argv[1], "llamacpp-"+v["kind"], v["decode_tok_s"], v["tokens"])' "$m" \
            >> "$OUT/runs.txt"
    else
        echo "bench-constrained: .venv-peers missing (scripts/setup-peers.sh): no llama.cpp peer" >&2
    fi
done
python3 - "$OUT/batch.txt" "$OUT/runs.txt" <<'PY'
import statistics, sys
from collections import defaultdict

def read(path):
    tps, toks = defaultdict(list), defaultdict(list)
    for line in open(path):
        m, kind, v, n = line.split()
        tps[(m, kind)].append(float(v)); toks[(m, kind)].append(int(n))
    return tps, toks

tps, toks = read(sys.argv[1])
print(f"{'model':<30} {'batch':<5} {'free tok/s':>10} {'schema tok/s':>12} {'tokens':>7} {'ratio':>6}")
for m in sorted({m for m, _ in tps}):
    for b in (1, 8):
        f = statistics.median(tps[(m, f"b{b}-free")]); c = statistics.median(tps[(m, f"b{b}-schema")])
        print(f"{m:<30} {b:<5} {f:>10.1f} {c:>12.1f} {statistics.median(toks[(m, f'b{b}-schema')]):>7} {c / f:>6.3f}")
tps, toks = read(sys.argv[2])
print(f"{'model':<30} {'kind':<15} {'decode tok/s':>12} {'tokens':>7} {'vs free':>8}")
for m in sorted({m for m, _ in tps}):
    free = statistics.median(tps[(m, "free")])
    for kind in ("free", "regex", "schema", "llamacpp-free", "llamacpp-schema"):
        if (m, kind) not in tps:
            continue
        v = statistics.median(tps[(m, kind)])
        print(f"{m:<30} {kind:<15} {v:>12.1f} {statistics.median(toks[(m, kind)]):>7} {v / free:>8.3f}")
    if (m, "llamacpp-schema") in tps:
        ours = statistics.median(tps[(m, "schema")]); peer = statistics.median(tps[(m, "llamacpp-schema")])
        print(f"{m:<30} constrained decode: flywheel {ours:.1f} tok/s, llama.cpp {peer:.1f} tok/s: {ours / peer:.2f}x")
PY

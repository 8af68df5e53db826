#!/usr/bin/env bash
# Serving benchmark: `flywheel serve` against llama.cpp's OpenAI-compatible server
# (`python -m llama_cpp.server` from llama-cpp-python), same GGUF, same prompts, same max_tokens.
#   1. throughput and TTFT under load: streaming greedy chat at concurrency 1, 8, 32
#      (requests = max(2*C, 8)), llama.cpp then flywheel at each level (scripts/bench/serve_load.py);
#   2. multi-adapter: flywheel with 8 random rank-16 LoRA adapters mixed round-robin vs one adapter
#      (and vs the base) at concurrency 8;
#   3. hot load: POST /v1/adapters of a rank-16 adapter 5 times (fresh names); median of the
#      server's `load_ms` and of the client's wall time.
# Prints each run as JSON and a table with ratios (>1 = flywheel faster). Results are kept in
# .bench/serve/ (git-ignored). Both servers are always stopped on exit.
#
# Usage: scripts/bench-serve.sh
# Env:   MODEL=path.gguf    base model (default the SmolLM2-135M Q4_1 GGUF; e.g. the Qwen2.5 GGUF)
#        MAX_TOKENS=32      tokens per request
#        SKIP_PEER=1        flywheel only (no llama.cpp server)
#        THREADS=$(nproc)   llama.cpp --n_threads/--n_threads_batch
#        CONCURRENCY="1 8 32"   levels for part 1
#        LOAD_TIMEOUT=600   cap in seconds on each load run (unfinished requests count as failed)
#        READY_TIMEOUT=180  cap in seconds on each server's startup
#        FLYWHEEL=path      use this flywheel binary instead of building target/release/flywheel
#        FLYWHEEL_ARGS=".." extra `flywheel serve` flags (e.g. "--max-batch 32")
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${MODEL:-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
MAX_TOKENS="${MAX_TOKENS:-32}"
SKIP_PEER="${SKIP_PEER:-0}"
THREADS="${THREADS:-$(nproc)}"
CONCURRENCY="${CONCURRENCY:-1 8 32}"
LOAD_TIMEOUT="${LOAD_TIMEOUT:-600}"
READY_TIMEOUT="${READY_TIMEOUT:-180}"
N_ADAPTERS=8
N_HOT=5
py=.venv-peers/bin/python
log() { printf '[bench-serve] %s\n' "$*" >&2; }

scripts/fetch-models.sh >/dev/null
scripts/setup-peers.sh >/dev/null
if [ -n "${FLYWHEEL:-}" ]; then
  fw="$FLYWHEEL"
else
  cargo build --release --bin flywheel >/dev/null
  fw=target/release/flywheel
fi
[ -e "$MODEL" ] || { log "MODEL $MODEL does not exist"; exit 1; }
if [ -d "$MODEL" ]; then
  shape_src=(--hf "$MODEL")
  [ "$SKIP_PEER" = 1 ] || { log "MODEL is a folder: llama.cpp needs a GGUF, so the peer is skipped"; SKIP_PEER=1; }
else
  shape_src=(--gguf "$MODEL")
fi

tmp=$(mktemp -d)
res=.bench/serve
rm -rf "$res"; mkdir -p "$res"
fw_pid=""; ll_pid=""
stop() {  # stop PID: SIGTERM, up to 10 s grace, then SIGKILL
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() { stop "$fw_pid"; stop "$ll_pid"; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- adapters: a0..a7 served from startup, h0..h4 for hot load (all inside --adapters-dir) ---
ads="$tmp/adapters"
log "writing $N_ADAPTERS + $N_HOT random rank-16 adapters for $MODEL"
for i in $(seq 0 $((N_ADAPTERS - 1))); do
  $py scripts/bench/make_random_adapter.py "${shape_src[@]}" --rank 16 --alpha 32 --seed "$i" --out "$ads/a$i" 2>/dev/null
done
for i in $(seq 0 $((N_HOT - 1))); do
  $py scripts/bench/make_random_adapter.py "${shape_src[@]}" --rank 16 --alpha 32 --seed $((100 + i)) --out "$ads/h$i" 2>/dev/null
done

free_port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- flywheel serve ---------------------------------------------------------------------------
adapter_flags=()
for i in $(seq 0 $((N_ADAPTERS - 1))); do adapter_flags+=(--adapter "a$i=$ads/a$i"); done
: >"$tmp/fw.out"  # exists before the poll below reads it
# shellcheck disable=SC2086  # FLYWHEEL_ARGS is a flag list
"$fw" serve --model "$MODEL" --adapters-dir "$ads" "${adapter_flags[@]}" --host 127.0.0.1 --port 0 \
  ${FLYWHEEL_ARGS:-} >"$tmp/fw.out" 2>"$tmp/fw.err" &
fw_pid=$!
fw_url=""
deadline=$((SECONDS + READY_TIMEOUT))
while [ -z "$fw_url" ]; do
  fw_url=$(sed -n 's#^flywheel serve: listening on \(http://[^ ]*\)$#\1#p' "$tmp/fw.out" | head -n1 || true)
  [ -n "$fw_url" ] && break
  if ! kill -0 "$fw_pid" 2>/dev/null; then log "flywheel serve exited during startup:"; cat "$tmp/fw.err" >&2; exit 1; fi
  if [ $SECONDS -ge $deadline ]; then log "flywheel serve not ready after ${READY_TIMEOUT}s"; tail -20 "$tmp/fw.err" >&2; exit 1; fi
  sleep 0.2
done
base=$(curl -sf "$fw_url/v1/models" | $py -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
log "flywheel serve ready at $fw_url (base model $base, $N_ADAPTERS adapters)"

# --- llama.cpp server -------------------------------------------------------------------------
# --interrupt_requests False: the default (True) ends a running stream as soon as another request
# waits, which truncates nearly every response under concurrency. The server has no parallel
# slots: it handles one request at a time behind a lock.
if [ "$SKIP_PEER" != 1 ]; then
  ll_port=$(free_port)
  $py -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$ll_port" --n_ctx 2048 \
    --n_threads "$THREADS" --n_threads_batch "$THREADS" --interrupt_requests False --verbose False \
    >"$tmp/ll.out" 2>&1 &
  ll_pid=$!
  ll_url="http://127.0.0.1:$ll_port"
  deadline=$((SECONDS + READY_TIMEOUT))
  until curl -sf -o /dev/null "$ll_url/v1/models"; do
    if ! kill -0 "$ll_pid" 2>/dev/null; then log "llama.cpp server exited during startup:"; tail -20 "$tmp/ll.out" >&2; exit 1; fi
    if [ $SECONDS -ge $deadline ]; then log "llama.cpp server not ready after ${READY_TIMEOUT}s"; tail -20 "$tmp/ll.out" >&2; exit 1; fi
    sleep 0.5
  done
  log "llama.cpp server ready at $ll_url (--n_threads $THREADS)"
fi

load() {  # load LABEL URL CONCURRENCY REQUESTS [MODELS]
  $py scripts/bench/serve_load.py --base-url "$2/v1" --label "$1" --concurrency "$3" --requests "$4" \
    --models "${5:-}" --max-tokens "$MAX_TOKENS" --timeout-s "$LOAD_TIMEOUT" --json "$res/$1.json" \
    || log "$1: no request succeeded"
}

# --- 1. throughput / TTFT vs concurrency --------------------------------------------------------
for c in $CONCURRENCY; do
  n=$((2 * c > 8 ? 2 * c : 8))
  [ "$SKIP_PEER" = 1 ] || load "llamacpp-c$c" "$ll_url" "$c" "$n"
  load "flywheel-c$c" "$fw_url" "$c" "$n" "$base"
done

# --- 2. multi-adapter at concurrency 8 ----------------------------------------------------------
mixed=$(for i in $(seq 0 $((N_ADAPTERS - 1))); do printf 'a%s,' "$i"; done)
load "flywheel-base-c8x32" "$fw_url" 8 32 "$base"
load "flywheel-single-c8x32" "$fw_url" 8 32 a0
load "flywheel-mixed-c8x32" "$fw_url" 8 32 "${mixed%,}"

# --- 3. hot load ---------------------------------------------------------------------------------
$py - "$fw_url" "$N_HOT" "$res/hotload.json" <<'PY'
import json, statistics, sys, time
import httpx
url, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
with httpx.Client(base_url=url, timeout=120) as c:
    for i in range(n):
        t0 = time.perf_counter()
        r = c.post("/v1/adapters", json={"name": f"hot{i}", "path": f"h{i}"})
        wall = (time.perf_counter() - t0) * 1000
        if r.status_code != 201:
            print(f"[bench-serve] hot load hot{i}: HTTP {r.status_code} {r.text[:200]}", file=sys.stderr)
            continue
        rows.append({"name": f"hot{i}", "load_ms": r.json().get("load_ms"), "wall_ms": round(wall, 2)})
    for row in rows:
        c.delete(f"/v1/adapters/{row['name']}")
med = lambda k: round(statistics.median(r[k] for r in rows if r[k] is not None), 2) if rows else None
summary = {"label": "hotload", "n": n, "ok": len(rows), "load_ms_median": med("load_ms"), "wall_ms_median": med("wall_ms"), "runs": rows}
print(json.dumps(summary))
open(out, "w").write(json.dumps(summary) + "\n")
PY

# --- table ---------------------------------------------------------------------------------------
python3 - "$res" "$MODEL" "$MAX_TOKENS" "$CONCURRENCY" <<'PY'
import json, sys
from pathlib import Path
d, model, max_tokens, levels = Path(sys.argv[1]), Path(sys.argv[2]).name, sys.argv[3], sys.argv[4].split()
runs = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
fmt = lambda x, f="{:.1f}": "-" if x is None else f.format(x)
print(f"\n{model}, {max_tokens} tokens/request, streaming greedy chat\n")
print("| run | concurrency | ok/requests | tok/s | TTFT p50 ms | TTFT p95 ms | tokens/request |\n|---|---|---|---|---|---|---|")
for name, r in sorted(runs.items(), key=lambda kv: (kv[1].get("concurrency", 0), kv[0])):
    if name == "hotload":
        continue
    print(f"| {name} | {r['concurrency']} | {r['ok']}/{r['requests']} | {fmt(r['tok_s'])} | {fmt(r['ttft_p50_ms'])} "
          f"| {fmt(r['ttft_p95_ms'])} | {fmt(r['mean_tokens'])} |")
ratio = lambda a, b: "-" if not a or not b or a.get("tok_s") is None or not b.get("tok_s") else f"{a['tok_s'] / b['tok_s']:.2f}×"
print("\nratios (tok/s):")
for c in levels:
    if f"llamacpp-c{c}" in runs:
        print(f"  flywheel / llama.cpp at concurrency {c}: {ratio(runs.get(f'flywheel-c{c}'), runs[f'llamacpp-c{c}'])}")
print(f"  8 adapters mixed / 1 adapter (c=8): {ratio(runs.get('flywheel-mixed-c8x32'), runs.get('flywheel-single-c8x32'))}")
print(f"  1 adapter / base (c=8): {ratio(runs.get('flywheel-single-c8x32'), runs.get('flywheel-base-c8x32'))}")
h = runs.get("hotload")
if h:
    print(f"  hot load (rank 16, {h['ok']}/{h['n']} ok): median load_ms {fmt(h['load_ms_median'])} (server), "
          f"{fmt(h['wall_ms_median'])} ms (client wall)")
print(f"\nresults: {d}/")
PY

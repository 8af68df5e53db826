#!/usr/bin/env bash
# Speed benchmark: flywheel against its peers on the same inputs, same threads, interleaved runs.
#   generation: llama.cpp (PyPI llama-cpp-python) on both default GGUF models —
#               prefill tok/s on a 512-token prompt, decode tok/s over 128 tokens, peak RSS;
#   embeddings: sentence-transformers (PyTorch CPU) on all-MiniLM-L6-v2 — sentences/s, peak RSS.
# Prints each run as JSON and a ratio table (flywheel / peer; >1 means flywheel is faster / smaller).
# Usage: scripts/bench-generate.sh [--threads N] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/fetch-models.sh >/dev/null
scripts/setup-peers.sh >/dev/null
cargo build --release --locked -p flywheel >/dev/null
fw=target/release/flywheel
py=.venv-peers/bin/python
out=$(mktemp -d)
models=(models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
        models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
for r in $(seq "$rounds"); do
  for m in "${models[@]}"; do
    # Interleave: peer then flywheel, each in a fresh process (one repeat each; rounds give the median).
    $py scripts/bench/peer_llamacpp.py --model "$m" --threads "$threads" --prompt-tokens 512 --gen-tokens 128 --repeats 1 | tee -a "$out/llamacpp.jsonl"
    $fw bench --model "$m" --threads "$threads" --prompt-tokens 512 --gen-tokens 128 --repeats 1 | tee -a "$out/flywheel.jsonl"
  done
  $py scripts/bench/peer_sentence_transformers.py --model models/all-minilm-l6-v2 --threads "$threads" --sentences 512 --batch 32 --write-sentences "$out/sentences.txt" | tee -a "$out/st.jsonl"
  $fw bench --model models/all-minilm-l6-v2 --threads "$threads" --embed-file "$out/sentences.txt" --batch-size 32 --repeats 3 | tee -a "$out/fw-embed.jsonl"
done
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
d = Path(sys.argv[1])
load = lambda f: [json.loads(l) for l in (d / f).read_text().splitlines() if l.strip()]
ll, fw = load("llamacpp.jsonl"), load("flywheel.jsonl")
print("\n| model | metric | flywheel | llama.cpp | ratio |\n|---|---|---|---|---|")
for m in sorted({r["model"] for r in fw}):
    a = [r for r in fw if r["model"] == m]; b = [r for r in ll if r["model"] == m]
    name = Path(m).name
    for key, unit in [("prefill_tok_s", "prefill tok/s (512)"), ("decode_tok_s", "decode tok/s (128)"), ("peak_rss_mib", "peak RSS MiB")]:
        x = statistics.median(r[key] for r in a); y = statistics.median(r[key] for r in b)
        ratio = (y / x) if key == "peak_rss_mib" else (x / y)
        print(f"| {name} | {unit} | {x:.1f} | {y:.1f} | {ratio:.2f}× |")
st, fe = load("st.jsonl"), load("fw-embed.jsonl")
x = statistics.median(r["sentences_per_s"] for r in fe); y = statistics.median(r["sentences_per_s"] for r in st)
print(f"| all-MiniLM-L6-v2 | sentences/s (batch 32) | {x:.1f} | {y:.1f} (sentence-transformers) | {x / y:.2f}× |")
x = statistics.median(r["peak_rss_mib"] for r in fe); y = statistics.median(r["peak_rss_mib"] for r in st)
print(f"| all-MiniLM-L6-v2 | peak RSS MiB | {x:.1f} | {y:.1f} (sentence-transformers) | {y / x:.2f}× |")
print("\nratios: speed = flywheel/peer, memory = peer/flywheel (both >1 = flywheel better)")
PY

#!/usr/bin/env bash
# Speed benchmark: flywheel against its peers on the same inputs, same threads, interleaved runs.
#   generation: llama.cpp (PyPI llama-cpp-python) on SmolLM2 Q4_1, SmolLM2 Q4_0 (requantized here
#               by llama.cpp's quantizer) and Qwen2.5-Coder Q4_K_M — prefill tok/s on a 512-token
#               prompt, decode tok/s over 128 tokens after a 16-token prompt and after the
#               512-token prompt, peak RSS, and decode as a fraction of the memory-bandwidth floor
#               (model bytes per token / read bandwidth, measured by a STREAM-style run);
#   embeddings: sentence-transformers (PyTorch CPU) on all-MiniLM-L6-v2 — sentences/s, peak RSS.
# Prints each run as JSON and a ratio table (flywheel / peer; >1 means flywheel is faster / smaller).
# --models picks the generation models (comma-separated; default smol-q4_1,smol-q4_0,qwen-q4_k_m):
#   llama1b-q4_k_m is a random-weight model in Llama-3.2-1B's shape, quantized to Q4_K_M here by
#   llama.cpp (scripts/bench/make_kquant_model.py), where nearly every weight is a K-quant.
# --no-embeddings skips the embedding comparison.
# Usage: scripts/bench-generate.sh [--threads N] [--rounds R] [--models LIST] [--no-embeddings]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; rounds=3; pick=smol-q4_1,smol-q4_0,qwen-q4_k_m; embeddings=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --models) pick="$2"; shift 2 ;;
    --no-embeddings) embeddings=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/fetch-models.sh >/dev/null
scripts/setup-peers.sh >/dev/null
cargo build --release --locked -p flywheel >/dev/null
cargo build --release --locked -p flywheel-kernels --example bandwidth >/dev/null
fw=target/release/flywheel
py=.venv-peers/bin/python
out=$(mktemp -d)
smol=models/smollm2-135m-instruct/SmolLM2-135M-Instruct
# Outside models/: a second GGUF in the model's folder would make the folder ambiguous to load.
mkdir -p .bench/models
models=()
for m in ${pick//,/ }; do
  case "$m" in
    smol-q4_1) models+=("$smol.Q4_1.gguf") ;;
    smol-q4_0)
      q40=.bench/models/SmolLM2-135M-Instruct.Q4_0.gguf
      $py scripts/bench/make_q4_0.py "$smol.Q4_1.gguf" "$q40"
      models+=("$q40") ;;
    qwen-q4_k_m) models+=(models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf) ;;
    llama1b-q4_k_m)
      l1b=.bench/models/llama-1b-shape.Q4_K_M.gguf
      $py scripts/bench/make_kquant_model.py "$smol.Q4_1.gguf" "$l1b" >/dev/null 2>&1 \
        || { echo "making $l1b failed" >&2; exit 1; }
      models+=("$l1b") ;;
    *) echo "unknown model '$m' (smol-q4_1, smol-q4_0, qwen-q4_k_m, llama1b-q4_k_m)" >&2; exit 2 ;;
  esac
done
RAYON_NUM_THREADS="$threads" target/release/examples/bandwidth | tee "$out/bandwidth.json"
for r in $(seq "$rounds"); do
  for m in "${models[@]}"; do
    # Interleave: peer then flywheel, each in a fresh process (one repeat each; rounds give the
    # median). A 512-token prompt (prefill, decode at depth 512, RSS), then a 16-token one (decode).
    for p in 512 16; do
      $py scripts/bench/peer_llamacpp.py --model "$m" --threads "$threads" --prompt-tokens $p --gen-tokens 128 --repeats 1 | tee -a "$out/llamacpp-$p.jsonl"
      $fw bench --model "$m" --threads "$threads" --prompt-tokens $p --gen-tokens 128 --repeats 1 | tee -a "$out/flywheel-$p.jsonl"
    done
  done
  [ "$embeddings" = 1 ] || continue
  $py scripts/bench/peer_sentence_transformers.py --model models/all-minilm-l6-v2 --threads "$threads" --sentences 512 --batch 32 --write-sentences "$out/sentences.txt" | tee -a "$out/st.jsonl"
  $fw bench --model models/all-minilm-l6-v2 --threads "$threads" --embed-file "$out/sentences.txt" --batch-size 32 --repeats 3 | tee -a "$out/fw-embed.jsonl"
done
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
d = Path(sys.argv[1])
load = lambda f: [json.loads(l) for l in (d / f).read_text().splitlines() if l.strip()]
bw = json.loads((d / "bandwidth.json").read_text())
print(f"\nmemory bandwidth ({bw['threads']} threads): read {bw['read_gb_s']} GB/s, copy {bw['copy_gb_s']} GB/s, triad {bw['triad_gb_s']} GB/s")
print("\n| model | metric | flywheel | llama.cpp | ratio |\n|---|---|---|---|---|")
rows = {p: (load(f"llamacpp-{p}.jsonl"), load(f"flywheel-{p}.jsonl")) for p in (512, 16)}
for m in sorted({r["model"] for r in rows[512][1]}):
    name = Path(m).name
    # Every weight is read once per decoded token (the output head is the tied embedding).
    floor = bw["read_gb_s"] * 1e9 / Path(m).stat().st_size
    med = lambda p, eng, key: statistics.median(r[key] for r in rows[p][eng] if r["model"] == m)
    for p, key, unit in [(512, "prefill_tok_s", "prefill tok/s (512)"), (16, "decode_tok_s", "decode tok/s (128)"),
                         (512, "decode_tok_s", "decode tok/s at depth 512"), (512, "peak_rss_mib", "peak RSS MiB")]:
        x, y = med(p, 1, key), med(p, 0, key)
        ratio = (y / x) if key == "peak_rss_mib" else (x / y)
        print(f"| {name} | {unit} | {x:.1f} | {y:.1f} | {ratio:.2f}× |")
    x, y = med(16, 1, "decode_tok_s"), med(16, 0, "decode_tok_s")
    print(f"| {name} | decode / bandwidth floor ({floor:.0f} tok/s) | {x / floor:.0%} | {y / floor:.0%} | |")
if not (d / "st.jsonl").exists():
    print("\nratios: speed = flywheel/peer, memory = peer/flywheel (both >1 = flywheel better)")
    sys.exit(0)
st, fe = load("st.jsonl"), load("fw-embed.jsonl")
x = statistics.median(r["sentences_per_s"] for r in fe); y = statistics.median(r["sentences_per_s"] for r in st)
print(f"| all-MiniLM-L6-v2 | sentences/s (batch 32) | {x:.1f} | {y:.1f} (sentence-transformers) | {x / y:.2f}× |")
x = statistics.median(r["peak_rss_mib"] for r in fe); y = statistics.median(r["peak_rss_mib"] for r in st)
print(f"| all-MiniLM-L6-v2 | peak RSS MiB | {x:.1f} | {y:.1f} (sentence-transformers) | {y / x:.2f}× |")
print("\nratios: speed = flywheel/peer, memory = peer/flywheel (both >1 = flywheel better)")
PY

#!/usr/bin/env bash
# Retrieval benchmark on this CPU, every number from the same run:
#   1. indexing throughput: `flywheel rag index` (extract + chunk + embed + write, chunks/s) against
#      sentence-transformers (PyTorch CPU) embedding exactly the same chunk texts, interleaved rounds;
#   2. query latency p50/p95 for dense, BM25 and hybrid at 10k and 100k synthetic chunks (query
#      embedding included; HNSW above the 50k-chunk threshold);
#   3. retrieval quality on the Python FAQ (179 questions, gold = the FAQ entry's section) over the
#      whole Python 3.11 documentation: recall@1/5/10, MRR@10, nDCG@10 per mode, and on the first
#      --llm-questions questions also +HyDE and +rerank with the default generator.
# Usage: scripts/bench-rag.sh [--threads N] [--rounds R] [--subset GLOB] [--skip-quality] [--skip-latency] [--llm-questions N]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; rounds=2; subset="faq/*,tutorial/*,howto/*"; quality=1; latency=1; llm_q=60
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --subset) subset="$2"; shift 2 ;;
    --skip-quality) quality=0; shift ;;
    --skip-latency) latency=0; shift ;;
    --llm-questions) llm_q="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/fetch-models.sh >/dev/null
scripts/prepare-faq-data.sh >/dev/null
scripts/setup-peers.sh >/dev/null
cargo build --release --locked -p flywheel >/dev/null
fw=target/release/flywheel
py=.venv-peers/bin/python
out=.bench/rag; mkdir -p "$out"
excludes=(--exclude 'genindex*' --exclude 'contents.html' --exclude 'search.html' --exclude 'py-modindex.html')
includes=(); IFS=',' read -ra globs <<< "$subset"; for g in "${globs[@]}"; do includes+=(--include "$g"); done

echo "## 1. indexing throughput (subset: $subset, $threads threads)" >&2
: > "$out/index-fw.jsonl"; : > "$out/index-st.jsonl"
for r in $(seq "$rounds"); do
  rm -f "$out/subset.sqlite"
  $fw rag index --threads "$threads" --store "$out/subset.sqlite" "${includes[@]}" "${excludes[@]}" data/python-doc \
    | tee -a "$out/index-fw.jsonl"
  # The exact texts flywheel embedded: heading trail, blank line, chunk text.
  python3 - "$out/subset.sqlite" "$out/chunks.jsonl" <<'PY'
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
with open(sys.argv[2], "w") as f:
    for h, t in c.execute("SELECT heading, text FROM chunks ORDER BY id"):
        f.write(json.dumps({"text": f"{h}\n\n{t}" if h else t}) + "\n")
PY
  $py scripts/bench/st_embed.py --model models/all-minilm-l6-v2 --input "$out/chunks.jsonl" \
    --threads "$threads" --batch-size 32 2>/dev/null | tee -a "$out/index-st.jsonl"
done

if [ "$latency" = 1 ]; then
  echo "## 2. query latency (synthetic chunks)" >&2
  $fw rag bench-latency --threads "$threads" --chunks 10000,100000 --queries 200 --dir "$out" | tee "$out/latency.jsonl"
else
  rm -f "$out/latency.jsonl"
fi

if [ "$quality" = 1 ]; then
  echo "## 3. retrieval quality on the Python FAQ" >&2
  if [ ! -f "$out/python-doc.sqlite" ]; then
    $fw rag index --threads "$threads" --store "$out/python-doc.sqlite" "${excludes[@]}" data/python-doc > "$out/index-full.json"
  fi
  $fw rag eval --threads "$threads" --store "$out/python-doc.sqlite" --questions data/python-faq/questions.jsonl \
    --modes dense,bm25,hybrid --json-out "$out/quality-all.json" > "$out/quality-all.md"
  $fw rag eval --threads "$threads" --store "$out/python-doc.sqlite" --questions data/python-faq/questions.jsonl \
    --limit "$llm_q" --rerank-candidates 10 --model models/smollm2-135m-instruct \
    --modes dense,bm25,hybrid,hybrid+hyde,hybrid+rerank --json-out "$out/quality-llm.json" > "$out/quality-llm.md"
fi

python3 - "$out" "$quality" <<'PY'
import json, statistics, sys
from pathlib import Path
d = Path(sys.argv[1])
load = lambda f: [json.loads(l) for l in (d / f).read_text().splitlines() if l.strip().startswith("{")]
fw, st = load("index-fw.jsonl"), load("index-st.jsonl")
x = statistics.median(r["chunks_written"] / r["total_s"] for r in fw)
y = statistics.median(r["chunks_per_s"] for r in st)
print("\n| indexing | chunks | flywheel chunks/s (index, embedding included) | sentence-transformers chunks/s (embedding only) | ratio |\n|---|---|---|---|---|")
print(f"| python docs subset | {fw[0]['chunks_written']} | {x:.1f} | {y:.1f} | {x / y:.2f}× |")
lat = load("latency.jsonl") if (d / "latency.jsonl").exists() else []
if lat:
    print("\n| chunks | mode | p50 ms | p95 ms | index |\n|---|---|---|---|---|")
for r in lat:
    print(f"| {r['chunks']} | {r['mode']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {'HNSW' if r['hnsw'] else 'exact'} |")
by = {(r["chunks"], r["mode"]): r for r in lat}
sizes = sorted({r["chunks"] for r in lat})
if len(sizes) >= 2:
    a, b = sizes[0], sizes[-1]
    print("\ngrowth of p50 from", a, "to", b, "chunks:", ", ".join(
        f"{m} {by[(b, m)]['p50_ms'] / by[(a, m)]['p50_ms']:.1f}×" for m in ("dense", "bm25", "hybrid")))
if sys.argv[2] == "1":
    print("\nAll questions:\n" + (d / "quality-all.md").read_text())
    print("With the generator (first questions only):\n" + (d / "quality-llm.md").read_text())
PY

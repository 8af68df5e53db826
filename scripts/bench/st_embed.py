#!/usr/bin/env python3
"""Peer for the indexing-throughput benchmark: embed chunks with sentence-transformers on CPU.

Reads JSONL chunks ({"text": ...} per line; other fields ignored), sets
torch.set_num_threads(T), loads SentenceTransformer(MODEL, device="cpu"), does one warm-up
encode of 8 texts, then times

    model.encode(texts, batch_size=B, normalize_embeddings=True, convert_to_numpy=True)

over all texts, --repeat times, and reports the median. Prints ONE line of JSON:

  {"peer":"sentence-transformers","chunks":N,"seconds":S,"chunks_per_s":R,"threads":T,
   "batch_size":B,"max_seq_length":L, ...extras}

Extras (after the fixed keys): seconds_all (every run), avg_tokens and truncated (chunks longer
than max_seq_length word pieces, [CLS]/[SEP] included, which sentence-transformers cuts),
model, version, torch. Tokenization for these extras happens outside the timed runs.

max_seq_length is what sentence-transformers uses: sentence_bert_config.json's value when the
model folder has one (256 for all-MiniLM-L6-v2), else the tokenizer's/model's limit.

With --out FILE, writes one line {"embedding":[...]} per input chunk, in input order (the
vectors of the last timed run; L2-normalized float32 printed as JSON numbers).

Usage:
  .venv-peers/bin/python scripts/bench/st_embed.py --model models/all-minilm-l6-v2 \
      --input chunks.jsonl --threads 2 --batch-size 32 [--out vectors.jsonl] [--repeat 1]
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import statistics
import sys
import time


def read_texts(path):
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"st_embed: {path}:{n}: expected a JSON object with a \"text\" field ({e})")
            if not isinstance(text, str):
                sys.exit(f"st_embed: {path}:{n}: \"text\" is not a string")
            texts.append(text)
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="sentence-transformers model folder")
    ap.add_argument("--input", required=True, help="JSONL with a \"text\" field per line")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs; the median is reported")
    ap.add_argument("--out", help="write {\"embedding\": [...]} per chunk, in input order")
    args = ap.parse_args()
    if args.threads < 1 or args.batch_size < 1 or args.repeat < 1:
        sys.exit("st_embed: --threads, --batch-size and --repeat must be >= 1")

    texts = read_texts(args.input)
    if not texts:
        sys.exit(f"st_embed: {args.input} holds no chunks")

    import torch
    torch.set_num_threads(args.threads)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    max_len = int(model.max_seq_length)

    def encode(batch):
        return model.encode(batch, batch_size=args.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    encode(texts[:8])  # warm-up
    times = []
    vecs = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        vecs = encode(texts)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)

    # Outside the timed runs: how long the chunks are in word pieces, and how many get cut.
    lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]

    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for v in vecs:
                f.write(json.dumps({"embedding": [float(x) for x in v]}) + "\n")
        os.replace(tmp, args.out)

    print(json.dumps({
        "peer": "sentence-transformers",
        "chunks": len(texts),
        "seconds": round(seconds, 4),
        "chunks_per_s": round(len(texts) / seconds, 2),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "max_seq_length": max_len,
        "seconds_all": [round(t, 4) for t in times],
        "avg_tokens": round(statistics.mean(lengths), 1),
        "truncated": sum(1 for n in lengths if n > max_len),
        "model": args.model,
        "version": sentence_transformers.__version__,
        "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Peer benchmark: sentence-transformers embedding throughput on CPU.

Prints ONE line of JSON:
  {"peer":"sentence-transformers","version":...,"torch":...,"model":...,"threads":T,
   "sentences":N,"batch":B,"sentences_per_s":...,"peak_rss_mib":...}

Method: N deterministic sentences (~30 word pieces each; words drawn from a
fixed list with random.Random(seed)); optionally written one per line to
--write-sentences FILE so the Rust side embeds exactly the same ones.
torch.set_num_threads(T); one warm-up batch; then time
model.encode(sentences, batch_size=B, normalize_embeddings=True); median of
--repeats (3) runs. Peak RSS is the process's ru_maxrss at the end.

Usage:
  .venv-peers/bin/python scripts/bench/peer_sentence_transformers.py --model PATH \
      --threads 2 --sentences 512 --batch 32 [--write-sentences FILE]
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import random
import resource
import statistics
import time

WORDS = (
    "the of and to in is was for on that with as by at from it an be are this which or "
    "have has had not but were they their one all more can will would about when there "
    "time people year water city music river house school system model data network "
    "language computer memory engine quickly slowly bright green ancient modern simple "
    "complex travel write read build measure compare library window garden mountain "
    "ocean market village teacher student doctor engineer history science energy light "
    "sound color paper stone bridge morning evening winter summer journey question answer"
).split()


def make_sentences(n, seed=1234):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(22, 28)  # ~common words => ~1 word piece each, + [CLS]/[SEP] + "."
        words = [rng.choice(WORDS) for _ in range(k)]
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + ".")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--write-sentences", metavar="FILE")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]

    sentences = make_sentences(args.sentences, args.seed)
    if args.write_sentences:
        with open(args.write_sentences, "w", encoding="utf-8") as f:
            f.write("\n".join(sentences) + "\n")

    import torch
    torch.set_num_threads(args.threads)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    tok = model.tokenizer
    avg_pieces = statistics.mean(len(tok(s)["input_ids"]) for s in sentences)

    with torch.inference_mode():
        model.encode(sentences[: args.batch], batch_size=args.batch, normalize_embeddings=True)
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.encode(sentences, batch_size=args.batch, normalize_embeddings=True)
            rates.append(len(sentences) / (time.perf_counter() - t0))

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "peer": "sentence-transformers",
        "version": sentence_transformers.__version__,
        "torch": torch.__version__,
        "model": args.model,
        "threads": args.threads,
        "sentences": len(sentences),
        "batch": args.batch,
        "avg_word_pieces": round(avg_pieces, 1),
        "sentences_per_s": round(statistics.median(rates), 2),
        "sentences_per_s_all": [round(x, 2) for x in rates],
        "peak_rss_mib": round(rss, 1),
        # 1-min load average at start/end: high values mean the numbers were contended
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()

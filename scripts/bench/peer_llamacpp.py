#!/usr/bin/env python3
"""Peer benchmark: llama.cpp (via llama-cpp-python) prefill and greedy decode speed.

Prints ONE line of JSON:
  {"peer":"llama.cpp","version":...,"model":...,"threads":T,"prompt_tokens":N,
   "gen_tokens":G,"repeats":R,"prefill_tok_s":...,"decode_tok_s":...,"peak_rss_mib":...}

Method: prompt of exactly N token ids (a fixed English text tokenized, repeated
and truncated; no BOS). Per repeat: llm.reset(); time llm.eval(prompt_ids)
(prefill); then G greedy tokens one at a time (argmax of last logits row +
llm.eval([tok])), timing the loop only. Medians over repeats. Peak RSS is the
process's ru_maxrss at the end.

Usage:
  .venv-peers/bin/python scripts/bench/peer_llamacpp.py --model PATH \
      --threads 2 --prompt-tokens 512 --gen-tokens 128 [--repeats 3]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import llama_cpp
import numpy as np

TEXT = (
    "The river wound through the valley, past orchards heavy with apples and fields of "
    "golden wheat. In the village, the baker opened his shop before dawn, and the smell of "
    "fresh bread drifted down the narrow streets. Children walked to school in small groups, "
    "arguing about games and homework, while their parents hurried to the train station. "
    "At the edge of town stood an old library, its shelves crowded with books on history, "
    "science, poetry, and travel. The librarian, a patient woman with silver hair, knew "
    "where every volume belonged and which readers would enjoy which stories. On rainy "
    "afternoons the reading room filled with students, retirees, and curious travellers "
    "who had stopped on their way to somewhere else. "
)


def build_prompt(llm, n):
    ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    out = []
    while len(out) < n:
        out.extend(ids)
    return out[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=1024)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    if args.prompt_tokens + args.gen_tokens > args.n_ctx:
        sys.exit(f"prompt+gen ({args.prompt_tokens}+{args.gen_tokens}) exceeds n_ctx {args.n_ctx}")

    t = args.threads
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=t,
                          n_threads_batch=t, n_batch=512, seed=0, verbose=False)
    n_vocab = llm.n_vocab()
    prompt = build_prompt(llm, args.prompt_tokens)
    assert len(prompt) == args.prompt_tokens

    def logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                     shape=(n_vocab,))

    prefill, decode = [], []
    for _ in range(args.repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t0))

        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            tok = int(np.argmax(logits()))
            llm.eval([tok])
        t1 = time.perf_counter()
        decode.append(args.gen_tokens / (t1 - t0))

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    print(json.dumps({
        "peer": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "model": args.model,
        "threads": t,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        "prefill_tok_s_all": [round(x, 2) for x in prefill],
        "decode_tok_s_all": [round(x, 2) for x in decode],
        "peak_rss_mib": round(rss, 1),
        # 1-min load average at start/end: high values mean the numbers were contended
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()

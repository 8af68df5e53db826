#!/usr/bin/env python3
"""Peer benchmark: llama.cpp's grammar path (llama-cpp-python, `LlamaGrammar.from_json_schema`)
against its free decoding, on one chat prompt, greedy.

Prints ONE line of JSON per kind (free, schema):
  {"peer":"llama.cpp","kind":...,"decode_tok_s":...,"tokens":...,"text":...}

Method: the model's own chat template (llama-cpp-python's `create_chat_completion`), streamed;
decode tok/s = (tokens - 1) / (time of the last token - time of the first), so the prompt and the
grammar's compilation are not counted, as flywheel's `decode_tok_s` does not count them.
Medians over repeats.

Usage:
  .venv-peers/bin/python scripts/bench/peer_llamacpp_grammar.py --model PATH --schema FILE \
      --prompt TEXT [--threads 2 --max-tokens 128 --repeats 3]
"""
import argparse
import json
import statistics
import time

import llama_cpp


def run(llm, prompt, max_tokens, grammar):
    stamps, text = [], []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], temperature=0.0, top_k=1,
        max_tokens=max_tokens, grammar=grammar, stream=True,
    ):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            stamps.append(time.perf_counter())
            text.append(delta)
    n = len(stamps)
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0
    return rate, n, "".join(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--schema", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    llm = llama_cpp.Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                          n_ctx=1024, verbose=False)
    schema = open(a.schema).read()
    for kind in ("free", "schema"):
        rates, n, text = [], 0, ""
        for _ in range(a.repeats):
            grammar = llama_cpp.LlamaGrammar.from_json_schema(schema, verbose=False) if kind == "schema" else None
            r, n, text = run(llm, a.prompt, a.max_tokens, grammar)
            rates.append(r)
        print(json.dumps({"peer": "llama.cpp", "version": llama_cpp.__version__, "kind": kind,
                          "decode_tok_s": statistics.median(rates), "tokens": n, "text": text[:80]}))


if __name__ == "__main__":
    main()

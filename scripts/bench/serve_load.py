#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (flywheel serve, llama.cpp's server).

Sends --requests streaming chat completions (temperature 0, --max-tokens, a fixed
list of 16 short prompts, request i uses prompt i mod 16 and model i mod len(--models)),
at most --concurrency in flight, and measures:
  TTFT      time from sending the request to the first chunk with non-empty content
            (or to the first chunk at all when the model emits no content);
  tokens    usage.completion_tokens of the final chunk (stream_options.include_usage)
            when the server reports it, else the number of chunks with content;
  tok/s     sum of generated tokens / wall time of the whole run (aggregate throughput).
Bounded: --timeout-s caps the whole run; unfinished requests count as failed.

Prints a human summary to stderr and ONE line of JSON to stdout (also written to --json);
exits 1 only when no request succeeded:
  {"label","base_url","concurrency","requests","ok","failed","wall_s","gen_tokens",
   "tok_s","ttft_p50_ms","ttft_p95_ms","latency_p50_ms","latency_p95_ms",
   "mean_tokens","usage_reported","finish_reasons","models","max_tokens","errors"}
  (finish_reasons counts "None" for streams that ended without one, e.g. cut off by the server)

Usage:
  .venv-peers/bin/python scripts/bench/serve_load.py --base-url http://127.0.0.1:8080/v1 \
      --requests 16 --concurrency 8 [--models a0,a1] [--max-tokens 32] [--timeout-s 300] \
      [--api-key K] [--warmup 1] [--label NAME] [--json OUT]
"""
import argparse
import asyncio
import json
import sys
import time

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "Give me a synonym for 'happy'.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Suggest a name for a pet turtle.",
    "Why is the sky blue?",
    "List two fruits that are yellow.",
    "What does HTTP stand for?",
    "Write one sentence about autumn.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What is the boiling point of water in Celsius?",
]


def percentile(xs, p):
    """Linear-interpolated percentile (p in 0..100); None for an empty list."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client, url, headers, model, prompt, max_tokens):
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first_any = first_content = None
    content_chunks = 0
    usage_tokens = None
    finish = None
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            if first_any is None:
                first_any = now
            for ch in chunk.get("choices") or []:
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
                if (ch.get("delta") or {}).get("content"):
                    content_chunks += 1
                    if first_content is None:
                        first_content = now
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = usage["completion_tokens"]
    t1 = time.perf_counter()
    first = first_content if first_content is not None else first_any
    return {
        "model": model,
        "ttft_s": (first - t0) if first is not None else (t1 - t0),
        "latency_s": t1 - t0,
        "tokens": usage_tokens if usage_tokens is not None else content_chunks,
        "usage_reported": usage_tokens is not None,
        "finish_reason": finish,
    }


async def run(args):
    models = [m for m in (args.models or "").split(",") if m] or [None]
    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for i in range(args.warmup):  # not measured: first-request costs (graph build, page-in)
            try:
                await asyncio.wait_for(one_request(client, url, headers, models[i % len(models)],
                                                   PROMPTS[i % len(PROMPTS)], args.max_tokens), args.timeout_s)
            except Exception as e:  # noqa: BLE001 — the measured run reports the failures
                print(f"[serve_load] warmup request failed: {type(e).__name__}: {e}", file=sys.stderr)
                break

        sem = asyncio.Semaphore(args.concurrency)
        results = [None] * args.requests

        async def worker(i):
            async with sem:
                model = models[i % len(models)]
                try:
                    results[i] = await one_request(client, url, headers, model, PROMPTS[i % len(PROMPTS)], args.max_tokens)
                except Exception as e:  # noqa: BLE001 — every failure is counted and reported
                    results[i] = {"model": model, "error": f"{type(e).__name__}: {e}"}

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    for i, r in enumerate(results):
        if r is None:
            results[i] = {"model": models[i % len(models)], "error": f"timeout: run exceeded --timeout-s {args.timeout_s}"}
    return results, wall, models


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--models", default="", help="comma-separated; round-robin over request index")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="cap on the whole measured run")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured sequential requests first")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None, help="also write the summary JSON here")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be >= 1")

    results, wall, models = asyncio.run(run(args))
    ok = [r for r in results if "error" not in r]
    bad = [r for r in results if "error" in r]
    gen = sum(r["tokens"] for r in ok)
    ms = lambda x: None if x is None else round(x * 1000.0, 1)  # noqa: E731
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    summary = {
        "label": args.label,
        "base_url": args.base_url,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "ok": len(ok),
        "failed": len(bad),
        "wall_s": round(wall, 3),
        "gen_tokens": gen,
        "tok_s": round(gen / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p95_ms": ms(percentile(ttft, 95)),
        "latency_p50_ms": ms(percentile(lat, 50)),
        "latency_p95_ms": ms(percentile(lat, 95)),
        "mean_tokens": round(gen / len(ok), 2) if ok else None,
        "usage_reported": sum(r["usage_reported"] for r in ok),
        "finish_reasons": {str(k): sum(r["finish_reason"] == k for r in ok) for k in sorted({r["finish_reason"] for r in ok}, key=str)},
        "models": [m for m in models if m],
        "max_tokens": args.max_tokens,
        "errors": sorted({r["error"] for r in bad})[:5],
    }
    print(
        f"[serve_load] {args.label or args.base_url} c={args.concurrency}: {len(ok)}/{args.requests} ok, "
        f"{summary['tok_s']} tok/s over {summary['wall_s']} s, TTFT p50 {summary['ttft_p50_ms']} ms "
        f"p95 {summary['ttft_p95_ms']} ms, {summary['mean_tokens']} tokens/request"
        + (f", errors: {summary['errors']}" if bad else ""),
        file=sys.stderr,
    )
    line = json.dumps(summary)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

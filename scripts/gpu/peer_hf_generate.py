"""Peer for the GPU generation benchmark (scripts/gpu/check.sh): Hugging Face transformers on
PyTorch, bf16, greedy, with the shapes flywheel's `bench` uses: a prompt of --prompt-tokens,
--gen-tokens new tokens whatever the model says (EOS ignored), --batch-size copies of the prompt.

Like flywheel's bench (and llama-bench): prefill tok/s = batch x prompt tokens over the time to
the first new token; decode tok/s = batch x (new tokens - 1) over the rest. Medians over repeats,
after a warm-up run. Prints one JSON line.
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 50000, (1, a.prompt_tokens), generator=g).repeat(a.batch_size, 1).to(dev)
    att = torch.ones_like(ids)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(n):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == a.prompt_tokens + n, out.shape
        return time.perf_counter() - t0

    run(a.gen_tokens)  # warm-up: kernels, allocator, cuBLAS handles
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pre, dec = [], []
    for _ in range(a.repeats):
        first = run(1)
        total = run(a.gen_tokens)
        pre.append(a.batch_size * a.prompt_tokens / first)
        dec.append(a.batch_size * (a.gen_tokens - 1) / max(total - first, 1e-9))
    out = {
        "engine": f"transformers {transformers.__version__} + torch {torch.__version__}",
        "device": a.device,
        "batch": a.batch_size,
        "prompt_tokens": a.prompt_tokens,
        "generated_tokens": a.gen_tokens,
        "prefill_tok_s": statistics.median(pre),
        "decode_tok_s": statistics.median(dec),
    }
    if dev.type == "cuda":
        out["peak_gpu_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()

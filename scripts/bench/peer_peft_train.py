"""Peer for scripts/bench-train.sh (CPU, fp32) and scripts/gpu/check.sh (CUDA, bf16): LoRA
training with Hugging Face PEFT + transformers (PyTorch) on the same model, data, rank, targets,
batch and sequence handling as flywheel.

Prints one JSON line: tokens/s (median over steps after the first), peak RSS, losses.
The loss is next-token cross-entropy on the assistant tokens only (prompt labels = -100), the
examples rendered with the model's chat template exactly as flywheel renders them.
"""
import argparse
import json
import resource
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="Hugging Face folder (dense)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--system", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--check-adapter", default=None,
                    help="also load this flywheel-trained adapter with PEFT and report it loads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = AutoTokenizer.from_pretrained(a.model)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(dev)
    out = {"peer": f"peft {__import__('peft').__version__} + transformers {__import__('transformers').__version__} + torch {torch.__version__}"}
    if a.check_adapter:
        pm = PeftModel.from_pretrained(model, a.check_adapter)
        n = sum(1 for k, _ in pm.named_parameters() if "lora_" in k)
        out["flywheel_adapter_loads_in_peft"] = n > 0
        model = pm.unload()
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()

    rows = [json.loads(l) for l in open(a.data) if l.strip()]
    examples = []
    for r in rows:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r["completion"]}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        examples.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    times, losses, tokens = [], [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for step in range(a.steps):
        batch = [examples[(step * a.batch + i) % len(examples)] for i in range(a.batch)]
        t = max(len(x[0]) for x in batch)
        ids = torch.tensor([x[0] + [pad] * (t - len(x[0])) for x in batch], device=dev)
        labels = torch.tensor([x[1] + [-100] * (t - len(x[1])) for x in batch], device=dev)
        att = torch.tensor([[1] * len(x[0]) + [0] * (t - len(x[0])) for x in batch], device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        tokens.append(sum(len(x[0]) for x in batch))
    tps = [n / s for n, s in zip(tokens[1:], times[1:])] or [tokens[0] / times[0]]
    out.update({
        "tokens_per_s": statistics.median(tps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": a.steps,
    })
    if dev.type == "cuda":
        out["peak_gpu_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()

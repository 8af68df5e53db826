"""Driver of scripts/bench-train.sh: LoRA training speed and peak memory, flywheel vs Hugging Face
PEFT (PyTorch, CPU, fp32), same model, data, rank, targets, batch and steps, runs interleaved.

flywheel trains twice: on the Q4_1 GGUF in place (QLoRA-style) and on a dense f32 Hugging Face
folder of the same weights (made by `flywheel merge` with an all-zero adapter, which also serves
PEFT). Prints a table with medians and ratios, and checks that PEFT loads a flywheel adapter.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / ".bench" / "train"


def peak_rss(cmd, env=None):
    """Runs cmd, sampling the resident set every 20 ms; returns (stdout, stderr, peak MiB, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    return out, err, peak / 2**20, time.perf_counter() - t0


def zero_adapter(path, hidden):
    """An all-zero rank-1 adapter on one projection: merging it dequantizes the GGUF unchanged."""
    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, hidden),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(hidden, 1),
    }, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))


def recipe(path, model, out_dir, a, device="cpu", dtype="f32", lr=2e-3):
    """Writes a lora-train recipe: a.data, a.system, a.max_seq_len, a.rank, a.batch, a.steps and
    a.checkpointing give the data, LoRA and batch settings (scripts/gpu/check.py uses it too)."""
    path.write_text(f"""
[model]
path = "{model}"
device = "{device}"
dtype = "{dtype}"
[data]
train = "{a.data}"
system = "{a.system}"
max_seq_len = {a.max_seq_len}
[lora]
r = {a.rank}
alpha = {a.rank * 2}
target_modules = "all-linear"
[optimizer]
lr = {lr}
[schedule]
kind = "constant"
[batch]
size = {a.batch}
max_steps = {a.steps}
gradient_checkpointing = {"true" if a.checkpointing else "false"}
[eval]
every = 0
[checkpoint]
every = 0
keep = 1
[output]
dir = "{out_dir}"
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fw", default=str(ROOT / "target/release/flywheel"))
    ap.add_argument("--py", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--gguf", default=str(ROOT / "models/smollm2-135m-instruct"))
    ap.add_argument("--data", default=str(ROOT / "recipes/data/quickstart/train.jsonl"))
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--skip-peft", action="store_true", help="flywheel only (quantized vs dense memory)")
    ap.add_argument("--checkpointing", action="store_true", help="flywheel with gradient checkpointing")
    a = ap.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    dense = BENCH / (pathlib.Path(a.gguf).name + "-f32")
    if not (dense / "model.safetensors").is_file():
        info = json.loads(subprocess.check_output([a.fw, "info", a.gguf, "--json"], text=True))
        zero_adapter(BENCH / "zero-adapter", info["hidden_size"])
        subprocess.check_call([a.fw, "merge", "-m", a.gguf, "--adapter", str(BENCH / "zero-adapter"), "--out", str(dense)])
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    results = {"flywheel gguf": [], "flywheel dense f32": [], "peft dense f32": []}
    for rep in range(a.repeats):
        for name, model in [("flywheel gguf", a.gguf), ("flywheel dense f32", str(dense))]:
            run = BENCH / f"run-{'gguf' if 'gguf' in name else 'dense'}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            rp = BENCH / "recipe.toml"
            recipe(rp, model, run, a)
            _, _, rss, _ = peak_rss([a.fw, "lora-train", str(rp)], env)
            steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            tps = statistics.median(s["tokens_per_s"] for s in steps[1:] if "tokens_per_s" in s)
            results[name].append({"tokens_per_s": tps, "peak_rss_mib": rss,
                                  "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]})
            print(f"[{rep}] {name}: {tps:.1f} tok/s, peak {rss:.0f} MiB", file=sys.stderr)
        if a.skip_peft:
            continue
        check = str(BENCH / "run-dense" / "adapter")
        out, _, rss, _ = peak_rss([a.py, str(ROOT / "scripts/bench/peer_peft_train.py"), "--model", str(dense),
                                   "--data", a.data, "--system", a.system, "--steps", str(a.steps),
                                   "--batch", str(a.batch), "--rank", str(a.rank), "--alpha", str(a.rank * 2),
                                   "--threads", str(a.threads), "--check-adapter", check], env)
        r = json.loads(out.strip().splitlines()[-1])
        r["peak_rss_mib"] = max(rss, r["peak_rss_mib"])
        results["peft dense f32"].append(r)
        print(f"[{rep}] peft: {r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_mib']:.0f} MiB; "
              f"loads flywheel adapter: {r.get('flywheel_adapter_loads_in_peft')}", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tokens_per_s", "peak_rss_mib")} for k, v in results.items() if v}
    if a.skip_peft:
        q, d = med["flywheel gguf"], med["flywheel dense f32"]
        print(f"\nLoRA training, {pathlib.Path(a.gguf).name}, r={a.rank} all-linear, batch {a.batch}, {a.steps} steps, {a.threads} threads, gradient checkpointing {a.checkpointing}")
        for k, v in med.items():
            print(f"{k:24} {v['tokens_per_s']:10.1f} tok/s {v['peak_rss_mib']:8.0f} MiB peak")
        print(f"quantized-base peak memory / dense-base: {q['peak_rss_mib'] / d['peak_rss_mib']:.2f}")
        return
    peft = med["peft dense f32"]
    print(f"\nLoRA training, SmolLM2-135M, r={a.rank} all-linear, batch {a.batch}, {a.steps} steps, "
          f"{a.threads} threads, {a.repeats} interleaved repeats (medians); peer: {results['peft dense f32'][0]['peer']}")
    print(f"{'':24} {'tokens/s':>10} {'vs PEFT':>8} {'peak RSS MiB':>13} {'vs PEFT':>8}")
    for k, v in med.items():
        print(f"{k:24} {v['tokens_per_s']:10.1f} {v['tokens_per_s'] / peft['tokens_per_s']:7.2f}x "
              f"{v['peak_rss_mib']:13.0f} {v['peak_rss_mib'] / peft['peak_rss_mib']:7.2f}x")
    q, d = med["flywheel gguf"], med["flywheel dense f32"]
    print(f"quantized-base peak memory / dense-base: {q['peak_rss_mib'] / d['peak_rss_mib']:.2f}")
    print(f"PEFT loads the flywheel adapter: {all(r.get('flywheel_adapter_loads_in_peft') for r in results['peft dense f32'])}")
    print(json.dumps({"results": results, "medians": med}))


if __name__ == "__main__":
    main()

"""Issue 7's checks, run ON the lent GPU machine over what scripts/gpu-build.sh made here:

    python3 scripts/gpu/check.py tests      # tiny-model invariants with FLYWHEEL_TEST_DEVICE=cuda
    python3 scripts/gpu/check.py generate   # bf16 prefill/decode, batch 1 and 32, vs transformers
    python3 scripts/gpu/check.py train      # LoRA training tokens/s and peak GPU memory vs PEFT
    python3 scripts/gpu/check.py kernels    # the fused mixed-adapter LoRA kernel vs candle's ops
    python3 scripts/gpu/check.py all

From this machine, through the device tool: carry `dist/gpu` and run
`python3 scripts/gpu/check.py all`. Models (random weights in real shapes, see fixtures.py) and
data are made under /tmp/flywheel-gpu on the first call and reused while the machine stays warm.
Every result is a JSON line in $OUT/gpu-results.jsonl (or ./gpu-results.jsonl without $OUT);
the last lines printed are a table with ratios against the peer.
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from train_bench import recipe  # noqa: E402  (the recipe the CPU training benchmark writes)

SYSTEM = "You are a helpful assistant."
DIST = ROOT / "dist" / "gpu"
WORK = pathlib.Path(os.environ.get("FLYWHEEL_GPU_WORK", "/tmp/flywheel-gpu"))
RUN = DIST / "run.sh"  # unpacks dist/gpu into WORK / "dist" on first use
UNPACKED = WORK / "dist"
OUT = pathlib.Path(os.environ.get("OUT", "."))
RESULTS = OUT / "gpu-results.jsonl"
ARCHS = ["qwen2-0.5b", "llama-1b"]

# The tests the issue names, by binary: (binary in dist/gpu/tests, filters).
TESTS = [
    ("test-models", ["decoder::tests::"]),
    ("test-peft-tiny", ["lora_gradients_match_finite_differences_dense_base",
                        "lora_gradients_match_finite_differences_quantized_base", "zero_b_leaves_logits_unchanged",
                   "fused_mixed_adapter_batch_equals_each_row_alone"]),
    ("test-fused", []),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def record(row):
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def smi(*query):
    """nvidia-smi's answer, or "" where there is none."""
    if not shutil.which("nvidia-smi"):
        return ""
    out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def gpu_used_mib():
    out = smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
    return float(out.split()[0]) if out else float("nan")


def run_measured(cmd, env=None):
    """Runs cmd; returns (stdout, peak GPU memory in MiB above what was in use before it)."""
    base = gpu_used_mib()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], gpu_used_mib())
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    done.set()
    t.join()
    if p.returncode != 0:
        log(f"FAILED ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-4000:]}")
        return None, peak[0] - base
    return p.stdout, peak[0] - base


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def fw(*args):
    return [RUN, "flywheel", *args]


def tests(_a):
    env = dict(os.environ, FLYWHEEL_TEST_DEVICE="cuda")
    ok = True
    for binary, filters in TESTS:
        if not (UNPACKED / binary).exists():
            log(f"{binary} missing: rebuild with scripts/gpu-build.sh")
            ok = False
            continue
        p = subprocess.run([RUN, binary, "--test-threads", "1", *filters], capture_output=True,
                           text=True, env=env)
        (OUT / f"tests-{binary}.log").write_text(p.stdout + p.stderr)
        summary = [l for l in p.stdout.splitlines() if l.startswith("test result")]
        passed = p.returncode == 0 and bool(summary)
        ok &= passed
        record({"check": "tests", "binary": binary, "passed": passed, "summary": summary[-1:] or p.stderr[-500:]})
        log(f"tests {binary}: {'ok' if passed else 'FAILED'} {summary[-1:] or p.stderr[-2000:]}")
    return ok


def model(arch):
    d = WORK / arch
    if not (d / "config.json").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, ROOT / "scripts/gpu/fixtures.py", "model", "--arch", arch,
                        "--tokenizer", UNPACKED / "tokenizer", "--out", d], check=True)
    return d


def generate(a):
    rows = []
    for arch in ARCHS:
        m = model(arch)
        for batch in (1, 32):
            shape = ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
                     "--batch-size", str(batch), "--repeats", str(a.repeats)]
            for engine in ("flywheel", "transformers"):
                if engine == "flywheel":
                    cmd = fw("bench", "--model", m, "--device", "cuda", "--dtype", "bf16", *shape)
                else:
                    cmd = [sys.executable, ROOT / "scripts/gpu/peer_hf_generate.py", "--model", m, *shape]
                out, peak = run_measured(cmd)
                row = {"check": "generate", "arch": arch, "batch": batch, "engine": engine, "peak_gpu_mib": peak}
                if out is not None:
                    row.update({k: v for k, v in last_json(out).items() if k in ("prefill_tok_s", "decode_tok_s")})
                record(row)
                rows.append(row)
                log(json.dumps(row))
    return rows


def train(a):
    data = WORK / "train.jsonl"
    if not data.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, ROOT / "scripts/gpu/fixtures.py", "data", "--examples", "512",
                        "--words", str(a.words), "--out", data], check=True)
    rows = []
    for arch in ARCHS:
        m = model(arch)
        for engine in ("flywheel", "peft"):
            row = {"check": "train", "arch": arch, "engine": engine, "batch": a.batch, "rank": a.rank}
            if engine == "flywheel":
                run = WORK / f"run-{arch}"
                subprocess.run(["rm", "-rf", str(run)], check=True)
                rp = WORK / f"recipe-{arch}.toml"
                spec = argparse.Namespace(data=data, system=SYSTEM, checkpointing=False, max_seq_len=a.max_seq_len,
                                          rank=a.rank, batch=a.batch, steps=a.steps)
                recipe(rp, m, run, spec, device="cuda", dtype="bf16", lr=2e-4)
                out, peak = run_measured(fw("lora-train", rp))
                if out is not None:
                    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
                    tps = [s["tokens_per_s"] for s in steps[1:] if "tokens_per_s" in s]
                    row.update({"tokens_per_s": statistics.median(tps) if tps else None,
                                "first_loss": steps[0].get("loss"), "last_loss": steps[-1].get("loss")})
            else:
                cmd = [sys.executable, ROOT / "scripts/bench/peer_peft_train.py", "--model", m, "--data", data,
                       "--system", SYSTEM, "--steps", str(a.steps), "--batch",
                       str(a.batch), "--rank", str(a.rank), "--alpha", str(a.rank * 2), "--device", "cuda",
                       "--dtype", "bf16", "--lr", "2e-4"]
                out, peak = run_measured(cmd)
                if out is not None:
                    r = last_json(out)
                    row.update({k: r.get(k) for k in ("tokens_per_s", "first_loss", "last_loss", "peer",
                                                       "peak_gpu_alloc_mib")})
            row["peak_gpu_mib"] = peak
            record(row)
            rows.append(row)
            log(json.dumps(row))
    return rows


def kernels(_a):
    out, _ = run_measured([RUN, "bench-bgmv"])
    rows = [json.loads(l) for l in (out or "").splitlines() if l.startswith("{")]
    for r in rows:
        record({"check": "kernels", **r})
    return rows


def ratio(x, y):
    return f"{x / y:.2f}x" if x and y else "-"


def table(gen, tr, kern=()):
    dev = smi("--query-gpu=name,driver_version", "--format=csv,noheader") or "no GPU found"
    print(f"\n{dev}; {time.strftime('%Y-%m-%d')}")
    if gen:
        print("generation, bf16       | flywheel prefill / decode tok/s | transformers | ratio prefill / decode")
        for arch in ARCHS:
            for batch in (1, 32):
                f = next((r for r in gen if r["arch"] == arch and r["batch"] == batch and r["engine"] == "flywheel"), {})
                t = next((r for r in gen if r["arch"] == arch and r["batch"] == batch and r["engine"] != "flywheel"), {})
                print(f"{arch:11} batch {batch:2} | {f.get('prefill_tok_s', 0):9.0f} / {f.get('decode_tok_s', 0):7.0f} "
                      f"| {t.get('prefill_tok_s', 0):9.0f} / {t.get('decode_tok_s', 0):7.0f} "
                      f"| {ratio(f.get('prefill_tok_s'), t.get('prefill_tok_s'))} / "
                      f"{ratio(f.get('decode_tok_s'), t.get('decode_tok_s'))}")
    if kern:
        print("fused mixed-adapter LoRA (lora_bgmv), 4 adapters r=16 | rows | fused us | candle ops us | speedup")
        for r in kern:
            print(f"{r['dtype']} {r['in']}->{r['out']:<5} | {r['rows']:4} | {r['fused_us']:8.1f} | {r['grouped_us']:8.1f} | {r['speedup']:.2f}x")
    if tr:
        print("LoRA training, bf16     | flywheel tok/s, peak MiB | PEFT tok/s, peak MiB | ratio tok/s, memory")
        for arch in ARCHS:
            f = next((r for r in tr if r["arch"] == arch and r["engine"] == "flywheel"), {})
            p = next((r for r in tr if r["arch"] == arch and r["engine"] == "peft"), {})
            print(f"{arch:23} | {f.get('tokens_per_s') or 0:8.0f}, {f.get('peak_gpu_mib', 0):7.0f} "
                  f"| {p.get('tokens_per_s') or 0:8.0f}, {p.get('peak_gpu_mib', 0):7.0f} "
                  f"| {ratio(f.get('tokens_per_s'), p.get('tokens_per_s'))}, "
                  f"{ratio(f.get('peak_gpu_mib'), p.get('peak_gpu_mib'))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["tests", "kernels", "generate", "train", "all"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="training batch")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--words", type=int, default=300, help="words per training example")
    ap.add_argument("--max-seq-len", type=int, default=512)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([RUN, "true"], check=True)  # unpack, and find the CUDA libraries
    log(smi() or "nvidia-smi: not found")
    ok, gen, tr, kern = True, [], [], []
    if a.what in ("tests", "all"):
        ok = tests(a)
    if a.what in ("kernels", "all"):
        kern = kernels(a)
    if a.what in ("generate", "all"):
        gen = generate(a)
    if a.what in ("train", "all"):
        tr = train(a)
    table(gen, tr, kern)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

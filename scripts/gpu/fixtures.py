"""Fixtures for the GPU benchmarks (issue 7), made on the GPU machine, where nothing can be
downloaded: Hugging Face folders with random weights in a real architecture's shape, and
synthetic instruction data of a fixed size.

    python3 scripts/gpu/fixtures.py model --arch qwen2-0.5b --tokenizer DIR --out DIR
    python3 scripts/gpu/fixtures.py data --examples 512 --words 300 --out train.jsonl

The tokenizer folder holds tokenizer.json and tokenizer_config.json (scripts/gpu-build.sh puts
Qwen2.5's, written by `flywheel merge`, in dist/gpu/tokenizer). Every shape uses that tokenizer's
vocabulary (151936 rows), so the 1B Llama shape has Qwen's vocabulary instead of Llama 3's.
Weights are drawn on the GPU in bf16 with a fixed seed: the speed of a model does not depend on
what its weights are, only on their shapes.
"""
import argparse
import json
import pathlib
import random
import shutil

# Real architectures' shapes: (model_type, fields of config.json).
SHAPES = {
    # Qwen2.5-0.5B / Qwen2.5-Coder-0.5B.
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                                 tie_word_embeddings=True, max_position_embeddings=32768)),
    # Llama-3.2-1B (with Qwen's vocabulary, see above).
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                               rope_theta=5e5, tie_word_embeddings=True,
                               max_position_embeddings=131072)),
}

WORDS = ("the of and to in is was for on that with as by at from it an be this are or which "
         "table query select join where group order count value index model data row column "
         "result error cache token layer weight train step loss batch rank adapter device").split()


def make_model(a):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = SHAPES[a.arch]
    tok_dir = pathlib.Path(a.tokenizer)
    tok = json.loads((tok_dir / "tokenizer_config.json").read_text())
    vocab = 151936
    cfg = AutoConfig.for_model(kind, vocab_size=vocab, rms_norm_eps=1e-6, **fields)
    cfg.bos_token_id = None
    cfg.eos_token_id = 151645  # <|im_end|>
    torch.manual_seed(a.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out = pathlib.Path(a.out)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"arch": a.arch, "parameters": n, "out": str(out), "chat_template": "chat_template" in tok}))


def make_data(a):
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for _ in range(a.examples):
            prompt = " ".join(rng.choice(WORDS) for _ in range(a.words // 3))
            answer = " ".join(rng.choice(WORDS) for _ in range(a.words - a.words // 3))
            f.write(json.dumps({"prompt": prompt.capitalize() + "?", "completion": answer.capitalize() + "."}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("--arch", choices=sorted(SHAPES), required=True)
    m.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("data")
    d.add_argument("--examples", type=int, default=512)
    d.add_argument("--words", type=int, default=300, help="words per example (prompt a third)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make_model(a) if a.cmd == "model" else make_data(a)


if __name__ == "__main__":
    main()

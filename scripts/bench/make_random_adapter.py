#!/usr/bin/env python3
"""Write a random LoRA adapter in the Hugging Face PEFT layout for a given base model.

For serving benchmarks and tests: the adapter is not trained, but its B matrices are
non-zero, so it changes the model's outputs (unlike a fresh PEFT init, where B = 0).

Shapes come from the base model itself:
  --gguf PATH  GGUF tensor infos (`blk.N.attn_q.weight`, ...; GGUF lists dims as
               ne0 = in features, ne1 = out features; read by a small built-in header parser);
  --hf DIR     a Hugging Face folder's safetensors headers (`model.layers.N.self_attn.q_proj.weight`,
               shape (out, in)).
Output (same layout as tests/fixtures/peft-adapter-smollm2/):
  DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, lora_dropout 0,
                                 use_rslora false, base_model_name_or_path = the model path given
  DIR/adapter_model.safetensors  float32, metadata {"format": "pt"};
      base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight  (r, in)  ~ U(±1/sqrt(in))
      base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight  (out, r) ~ N(0, 0.02)

Usage (in .venv-peers: needs numpy and safetensors):
  .venv-peers/bin/python scripts/bench/make_random_adapter.py \
      --gguf models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      --rank 16 --alpha 32 --seed 0 --out /tmp/adapters/a0
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# GGUF tensor suffix -> (HF module group, HF projection name)
GGUF_TO_HF = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
GROUP = {proj: group for group, proj in GGUF_TO_HF.values()}


def gguf_tensor_dims(path):
    """{name: [ne0, ne1, ...]} from a GGUF file's header (v2/v3), without reading tensor data.

    A minimal reader: metadata values are skipped, not decoded, so this takes milliseconds where
    gguf-py's GGUFReader spends seconds decoding the tokenizer arrays.
    """
    import struct

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
    with open(path, "rb") as f:
        def read(fmt):
            fmt = "<" + fmt
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))

        def skip_string():
            (n,) = read("Q")
            f.seek(n, 1)

        def skip_value(vtype):
            if vtype in scalar:
                f.seek(scalar[vtype], 1)
            elif vtype == 8:  # string
                skip_string()
            elif vtype == 9:  # array: element type, count, elements
                etype, count = read("IQ")
                if etype in scalar:
                    f.seek(scalar[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        magic, version = read("4sI")
        if magic != b"GGUF" or version < 2:
            sys.exit(f"make_random_adapter: {path}: not a GGUF v2+ file")
        n_tensors, n_kv = read("QQ")
        for _ in range(n_kv):
            skip_string()
            (vtype,) = read("I")
            skip_value(vtype)
        dims = {}
        for _ in range(n_tensors):
            (n,) = read("Q")
            name = f.read(n).decode("utf-8")
            (n_dims,) = read("I")
            dims[name] = list(read(f"{n_dims}Q"))
            read("IQ")  # ggml type, data offset
    return dims


def shapes_from_gguf(path):
    """{(layer, proj): (out, in)} from a GGUF file's tensor infos (ne0 = in, ne1 = out)."""
    out = {}
    pat = re.compile(r"^blk\.(\d+)\.(" + "|".join(GGUF_TO_HF) + r")\.weight$")
    for name, ne in gguf_tensor_dims(path).items():
        m = pat.match(name)
        if m:
            if len(ne) != 2:
                sys.exit(f"make_random_adapter: {path}: {name} has {len(ne)} dims, expected 2")
            out[(int(m.group(1)), GGUF_TO_HF[m.group(2)][1])] = (ne[1], ne[0])
    return out


def shapes_from_hf(folder):
    """{(layer, proj): (out, in)} from the safetensors headers of a Hugging Face folder."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        sys.exit(f"make_random_adapter: no *.safetensors in {folder}")
    pat = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(" + "|".join(ALL_TARGETS) + r")\.weight$")
    out = {}
    for f in files:
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                m = pat.match(k)
                if m:
                    shape = st.get_slice(k).get_shape()
                    out[(int(m.group(1)), m.group(3))] = (int(shape[0]), int(shape[1]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="GGUF base model file")
    src.add_argument("--hf", help="Hugging Face model folder")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the normal init of lora_B")
    ap.add_argument("--target-modules", default=",".join(ALL_TARGETS), help="comma-separated subset of " + ",".join(ALL_TARGETS))
    ap.add_argument("--out", required=True, help="adapter folder to write (created)")
    args = ap.parse_args()

    targets = [t for t in args.target_modules.split(",") if t]
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        ap.error(f"--target-modules: unknown {bad}; choose from {ALL_TARGETS}")
    if args.rank < 1:
        ap.error("--rank must be >= 1")
    model_path = args.gguf or args.hf
    if not os.path.exists(model_path):
        sys.exit(f"make_random_adapter: {model_path}: no such file or folder")
    shapes = shapes_from_gguf(model_path) if args.gguf else shapes_from_hf(model_path)
    layers = sorted({layer for layer, _ in shapes})
    if not layers:
        sys.exit(f"make_random_adapter: {model_path}: no decoder projection weights found")
    missing = [(l, p) for l in layers for p in targets if (l, p) not in shapes]
    if missing:
        sys.exit(f"make_random_adapter: {model_path}: missing projections {missing[:5]}")

    rng = np.random.default_rng(args.seed)
    tensors = {}
    for layer in layers:
        for proj in targets:
            d_out, d_in = shapes[(layer, proj)]
            prefix = f"base_model.model.model.layers.{layer}.{GROUP[proj]}.{proj}"
            bound = 1.0 / math.sqrt(d_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (args.rank, d_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0.0, args.b_std, (d_out, args.rank)).astype(np.float32)

    alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(model_path),
        "r": args.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.size for t in tensors.values())
    print(f"make_random_adapter: wrote {out} ({len(layers)} layers x {len(targets)} modules, rank {args.rank}, "
          f"alpha {alpha}, {n_params} params, {n_params * 4 / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()

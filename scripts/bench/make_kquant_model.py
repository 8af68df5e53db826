"""Makes a GGUF in Llama-3.2-1B's shape (hidden 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads)
with seeded random weights, quantized to Q4_K_M by llama.cpp's own quantizer (llama-cpp-python),
for scripts/bench-generate.sh --kquants: with every row length a multiple of 256, nearly all its
weights are K-quants (Q4_K, Q6_K), unlike Qwen2.5-Coder-0.5B's file where only ffn_down is. The
tokenizer is SmolLM2's (copied from its GGUF), so the vocabulary is 49152. Speed only: the
output is noise. Idempotent: an existing output is kept.

Usage: python make_kquant_model.py TOKENIZER_SOURCE.gguf DST.gguf
"""
import os
import sys

import gguf
import llama_cpp
import numpy as np
from make_q4_0 import quantize

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 2048, 16, 8192, 32, 8


def copy_tokenizer(src: str, w: gguf.GGUFWriter) -> int:
    """Copies the tokenizer.* keys of `src` into `w`; returns the vocabulary size."""
    r = gguf.GGUFReader(src)
    vocab = 0
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        t = field.types
        if t[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
            if key == "tokenizer.ggml.tokens":
                vocab = len(value)
        elif t[0] == gguf.GGUFValueType.STRING:
            w.add_string(key, value)
        elif t[0] == gguf.GGUFValueType.BOOL:
            w.add_bool(key, value)
        elif t[0] == gguf.GGUFValueType.UINT32:
            w.add_uint32(key, value)
        elif t[0] == gguf.GGUFValueType.INT32:
            w.add_int32(key, value)
        elif t[0] == gguf.GGUFValueType.FLOAT32:
            w.add_float32(key, value)
        else:
            raise SystemExit(f"{src}: {key} has a type this script does not copy ({t})")
    return vocab


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    if os.path.exists(dst):
        return 0
    f16 = dst + ".f16.part"
    w = gguf.GGUFWriter(f16, "llama")
    vocab = copy_tokenizer(src, w)
    head_dim = HIDDEN // HEADS
    w.add_name("random llama-1b shape")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    kv = KV_HEADS * head_dim
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(b + "attn_q.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "attn_k.weight", weight(kv, HIDDEN))
        w.add_tensor(b + "attn_v.weight", weight(kv, HIDDEN))
        w.add_tensor(b + "attn_output.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "ffn_gate.weight", weight(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", weight(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", weight(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    rc = quantize(f16, dst, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, allow_requantize=False)
    os.remove(f16)
    return rc


if __name__ == "__main__":
    sys.exit(main())

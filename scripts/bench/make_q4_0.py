"""Makes a Q4_0 copy of a GGUF with llama.cpp's own quantizer (llama-cpp-python), for the
Q4_0 rows of scripts/bench-generate.sh: the model packages ship Q4_1 / Q4_K_M only. The source
is already quantized, so this requantizes (allow_requantize); the result is meant for speed
measurements, not for quality. Idempotent: an existing output is kept.

Usage: python make_q4_0.py SRC.gguf DST.gguf
"""
import ctypes
import os
import sys

import llama_cpp


def quantize(src: str, dst: str, ftype: int, allow_requantize: bool) -> int:
    """Quantizes `src` to `dst` with llama.cpp (through `dst.part`, renamed when done)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.nthread = 2
    tmp = dst + ".part"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize failed ({rc}) for {src}", file=sys.stderr)
        return 1
    os.replace(tmp, dst)
    return 0


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    if os.path.exists(dst):
        return 0
    return quantize(src, dst, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, allow_requantize=True)


if __name__ == "__main__":
    sys.exit(main())

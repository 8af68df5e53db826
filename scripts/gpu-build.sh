#!/usr/bin/env bash
# Builds flywheel with `--features cuda` on a machine without a GPU, for the lent
# GPU machine (issue 7). Everything CUDA comes from PyPI wheels pinned to CUDA
# 13.0, whose PTX the device's driver (580, CUDA 13.0) loads:
#   - nvcc, cicc, the headers and the runtime/cuBLAS/cuRAND/NVRTC libraries to
#     link against, unpacked into .tools/cuda-13.0 (git-ignored, idempotent);
#   - libcuda.so, the driver, is not in any wheel: a stub with the driver's
#     soname and the driver API's symbols is generated, only to link against.
#     At run time the real driver is loaded.
# Output, in dist/gpu/ (git-ignored, small enough for the device tool's 64 MiB):
#   bin/flywheel.xz     the stripped release binary, xz-compressed
#   bin/test-*.xz       test binaries whose tests run on FLYWHEEL_TEST_DEVICE
#   tokenizer/          Qwen2.5's tokenizer, for the random-weight models made there
#   run.sh              on the device: unpacks the above, sets LD_LIBRARY_PATH, runs a command
# Then, on the GPU machine: python3 scripts/gpu/check.py all (see that file).
# Usage: scripts/gpu-build.sh [--arch 90] [--no-tests] [--clippy]
#   --clippy  only runs clippy (-D warnings) over the CUDA code paths, building nothing
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ARCH=90
TESTS=1
CLIPPY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="$2"; shift 2 ;;
        --no-tests) TESTS=0; shift ;;
        --clippy) CLIPPY=1; shift ;;
        -h|--help) sed -n 2,17p "$0"; exit 0 ;;
        *) echo "gpu-build: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

TOOLS=$ROOT/.tools/cuda-13.0
CUDA=$TOOLS/nvidia/cu13
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.1.1.3
)

if [ ! -f "$TOOLS/.complete" ]; then
    echo "gpu-build: fetching the CUDA 13.0 toolchain wheels from PyPI into $TOOLS" >&2
    rm -rf "$TOOLS"
    mkdir -p "$TOOLS/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        -d "$TOOLS/wheels" "${WHEELS[@]}"
    for w in "$TOOLS"/wheels/*.whl; do
        (cd "$TOOLS" && python3 -m zipfile -e "$w" .)
    done
    rm -rf "$TOOLS/wheels"
    chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
    # Unversioned names for the linker.
    for lib in cudart cublas cublasLt curand nvrtc; do
        so=$(ls "$CUDA"/lib/lib$lib.so.* | grep -v -e alt -e builtins | head -1)
        ln -sf "$(basename "$so")" "$CUDA/lib/lib$lib.so"
    done
    # The driver stub: every driver API entry point cudarc can call.
    mkdir -p "$CUDA/lib/stubs"
    DRIVER_RS=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs 2>/dev/null | head -1)
    if [ -z "$DRIVER_RS" ]; then
        cargo fetch --locked >/dev/null
        DRIVER_RS=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)
    fi
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$DRIVER_RS" | sed 's/^pub unsafe fn \(.*\)/void \1(void) {}/' | sort -u \
        > "$CUDA/lib/stubs/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$CUDA/lib/stubs/cuda_stub.c"
    "$CUDA/bin/nvcc" --version | tail -1 >&2
    touch "$TOOLS/.complete"
fi

export PATH=$CUDA/bin:$PATH
export CUDA_ROOT=$CUDA CUDA_HOME=$CUDA CUDA_PATH=$CUDA
export CUDA_COMPUTE_CAP=$ARCH
export LIBRARY_PATH=$CUDA/lib:$CUDA/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=$ROOT/target/cuda

FEATURES=flywheel/cuda,flywheel-models/cuda,flywheel-peft/cuda,flywheel-train/cuda,flywheel-fused/cuda
if [ "$CLIPPY" = 1 ]; then
    exec cargo clippy --release --locked --all-targets -p flywheel -p flywheel-models -p flywheel-peft -p flywheel-train \
        -p flywheel-fused --features "$FEATURES" -- -D warnings
fi

# One cargo invocation builds the binary and the test binaries, so that every crate sees one
# feature set (separate invocations re-ran candle-kernels' nvcc build, ~10 minutes each).
OUTDIR=$ROOT/dist/gpu
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/bin"
PACKAGES=(-p flywheel)
[ "$TESTS" = 1 ] && PACKAGES+=(-p flywheel-models -p flywheel-train -p flywheel-fused)
echo "gpu-build: cargo test --no-run --release --features cuda (sm_$ARCH) ${PACKAGES[*]}, target dir $CARGO_TARGET_DIR" >&2
cargo test --release --locked --no-run --features "$FEATURES" "${PACKAGES[@]}" --message-format=json-render-diagnostics \
    > "$CARGO_TARGET_DIR/gpu-build.json"
# The artifacts to ship, by name: the binary, and the test binaries whose tests take their
# device from FLYWHEEL_TEST_DEVICE (scripts/gpu/check.py names the tests to run).
python3 - "$CARGO_TARGET_DIR/gpu-build.json" "$TESTS" > "$CARGO_TARGET_DIR/gpu-artifacts.txt" <<'PY'
import json, sys
want = {("flywheel", "bin", False): "flywheel"}
if sys.argv[2] == "1":
    want.update({("flywheel_models", "lib", True): "test-models", ("tiny", "test", True): "test-peft-tiny",
                 ("flywheel_fused", "lib", True): "test-fused", ("bgmv_bench", "example", False): "bench-bgmv"})
found = {}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    pkg = m["package_id"]
    key = (m["target"]["name"], m["target"]["kind"][0], bool(m["profile"]["test"]))
    if key in want and ("flywheel-train" in pkg or key[0] != "tiny"):
        found[want[key]] = m["executable"]
missing = set(want.values()) - set(found)
if missing:
    sys.exit(f"gpu-build: no artifact for {sorted(missing)}")
for name, exe in sorted(found.items()):
    print(name, exe)
PY
# Stripped and xz-compressed: the binary alone is ~75 MiB stripped (33 MiB of it candle's
# sm_90 kernels), over what one device call carries; compressed it is ~12 MiB.
while read -r name exe; do
    strip -o "$CARGO_TARGET_DIR/$name.stripped" "$exe"
    xz -T0 -6 -c "$CARGO_TARGET_DIR/$name.stripped" > "$OUTDIR/bin/$name.xz"
done < "$CARGO_TARGET_DIR/gpu-artifacts.txt"

# The Qwen2.5 tokenizer for the random-weight models made on the device (scripts/gpu/fixtures.py):
# `flywheel merge` with an all-zero adapter writes it as tokenizer.json from the GGUF.
QWEN=models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
[ -f "$QWEN" ] || bash scripts/fetch-models.sh >&2
(unset CARGO_TARGET_DIR; cargo build --release --locked -p flywheel >&2)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 - "$TMP/zero" 896 <<'PY'
import json, pathlib, struct, sys
out, h = pathlib.Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True)
pre = "base_model.model.model.layers.0.self_attn.q_proj."
shapes = {pre + "lora_A.weight": [1, h], pre + "lora_B.weight": [h, 1]}
header, off = {}, 0
for k, s in shapes.items():
    header[k] = {"dtype": "F32", "shape": s, "data_offsets": [off, off + 4 * s[0] * s[1]]}
    off += 4 * s[0] * s[1]
hb = json.dumps(header).encode()
hb += b" " * (-len(hb) % 8)
(out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(off))
(out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
    "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
PY
target/release/flywheel merge -m "$QWEN" --adapter "$TMP/zero" --out "$TMP/merged" --dtype bf16 >&2
mkdir -p "$OUTDIR/tokenizer"
xz -T0 -6 -c "$TMP/merged/tokenizer.json" > "$OUTDIR/tokenizer/tokenizer.json.xz"
cp "$TMP/merged/tokenizer_config.json" "$OUTDIR/tokenizer/"

cat > "$OUTDIR/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine: unpacks dist/gpu (xz) into $FLYWHEEL_GPU_WORK/dist (default
# /tmp/flywheel-gpu/dist) once, finds the CUDA 13 libraries the binaries link against (the
# toolkit's or PyTorch's wheels) and runs the command given, e.g.
#   dist/gpu/run.sh flywheel --help     (a bare name of an unpacked binary is looked up there)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIST=${FLYWHEEL_GPU_WORK:-/tmp/flywheel-gpu}/dist
stamp=$(ls -l --time-style=+%s "$HERE"/bin "$HERE"/tokenizer | md5sum | cut -c1-16)
if [ "$(cat "$DIST/.stamp" 2>/dev/null)" != "$stamp" ]; then
    python3 - "$HERE" "$DIST" <<'PY'
import lzma, pathlib, shutil, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in list(src.glob("bin/*.xz")) + list(src.glob("tokenizer/*")):
    out = dst / ("." if f.parent.name == "bin" else "tokenizer") / f.name.removesuffix(".xz")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (lzma.open(f) if f.suffix == ".xz" else open(f, "rb")) as i, open(out, "wb") as o:
        shutil.copyfileobj(i, o)
    if f.parent.name == "bin":
        out.chmod(0o755)
PY
    echo "$stamp" > "$DIST/.stamp"
fi
dirs=$(cat "$DIST/.libdirs" 2>/dev/null || true)
if [ -z "$dirs" ]; then
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
        d=$(find /usr/local/cuda* /usr/lib /opt / -xdev -name "$lib" -printf '%h\n' 2>/dev/null | head -1 || true)
        [ -n "$d" ] || { echo "run.sh: $lib not found on this machine" >&2; exit 1; }
        case ":$dirs:" in *":$d:"*) ;; *) dirs=${dirs:+$dirs:}$d ;; esac
    done
    echo "$dirs" > "$DIST/.libdirs"
fi
export LD_LIBRARY_PATH=$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cmd=$1
shift
[ -x "$DIST/$cmd" ] && cmd=$DIST/$cmd
exec "$cmd" "$@"
EOF
chmod +x "$OUTDIR/run.sh"
du -sh "$OUTDIR"/bin/* "$OUTDIR"/tokenizer >&2
total=$(du -sm "$OUTDIR" | cut -f1)
if [ "$total" -gt 60 ]; then
    echo "gpu-build: dist/gpu is ${total} MiB, over what the device tool carries in one call" >&2
    exit 1
fi
echo "gpu-build: done. On the GPU machine (device tool, carry dist/gpu): python3 scripts/gpu/check.py all" >&2

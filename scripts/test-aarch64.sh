#!/usr/bin/env bash
# The aarch64 kernels (NEON, with and without the dot-product instructions) tested under
# emulation: cross-compiles flywheel-kernels' tests for aarch64-unknown-linux-gnu and runs them
# with qemu-user twice, as a CPU with FEAT_DotProd (qemu's default "max") and as a Cortex-A53
# (plain NEON). Installs what it needs if missing: the Rust target (rustup), Debian's
# gcc-aarch64-linux-gnu (the linker) and qemu-user.
#
# FLYWHEEL_AARCH64=skip skips it; FLYWHEEL_AARCH64=auto (what scripts/test.sh sets) says so loudly
# and exits 0 when the tools cannot be installed (no root, no registry); the default, required,
# fails then. Timings under emulation mean nothing; this checks results only.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${FLYWHEEL_AARCH64:-required}"
target=aarch64-unknown-linux-gnu
[[ "$mode" == skip ]] && { echo "aarch64 kernel tests: skipped (FLYWHEEL_AARCH64=skip)"; exit 0; }

unavailable() {
    if [[ "$mode" == auto ]]; then
        echo "!! aarch64 kernel tests NOT RUN: $1" >&2
        exit 0
    fi
    echo "aarch64 kernel tests: $1" >&2
    exit 1
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" || unavailable "rustup could not add $target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo=""
    [[ "$(id -u)" != 0 ]] && sudo="sudo -n"
    { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; } >/dev/null \
        || unavailable "could not install gcc-aarch64-linux-gnu and qemu-user"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for cpu_path in max:neon+dotprod cortex-a53:neon; do
    cpu="${cpu_path%%:*}"
    echo "== flywheel-kernels on $target, qemu -cpu $cpu"
    FLYWHEEL_EXPECT_KERNEL_PATH="${cpu_path#*:}" CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
        cargo test --locked --release -p flywheel-kernels --target "$target" --lib
done

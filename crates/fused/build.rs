//! With the `cuda` feature, compiles every `kernels/cuda/*.cu` to PTX in OUT_DIR with nvcc
//! (`NVCC` or the one on PATH) for `CUDA_COMPUTE_CAP` (default 80; scripts/gpu-build.sh sets 90).
//! Without it, does nothing: the CPU build needs no CUDA toolkit.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../kernels/cuda");
    println!("cargo::rerun-if-changed={}", dir.display());
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim_end_matches(['a', 'f']);
    for entry in std::fs::read_dir(&dir).expect("kernels/cuda") {
        let src = entry.expect("kernels/cuda entry").path();
        if src.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let ptx = out.join(src.with_extension("ptx").file_name().unwrap());
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or PATH): {e}"));
        assert!(status.success(), "{nvcc} failed on {}", src.display());
    }
}

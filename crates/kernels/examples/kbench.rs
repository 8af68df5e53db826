//! Kernel micro-benchmark:
//! `cargo run --release -p flywheel-kernels --example kbench [n k m] [auto|baseline|scalar] [rows4]`
//! (`rows4`: the 32-element types repacked into `Layout::Rows4`).
//! Times `matmul` per block type on random weights and prints ns per block and GB/s of weights.
use flywheel_kernels::{matmul, pack_rows4, BlockType, Layout, Path, QMatrix, ALL_TYPES};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(1536);
    let k = args.get(1).copied().unwrap_or(4608);
    let m = args.get(2).copied().unwrap_or(1);
    let (path, name) = match std::env::args()
        .skip(1)
        .find(|a| a.parse::<usize>().is_err() && a != "--bench")
    {
        Some(p) if p.ends_with("scalar") => (Path::Scalar, "scalar".to_string()),
        Some(p) if p.ends_with("baseline") => (Path::Baseline, "baseline".to_string()),
        _ => (Path::Auto, flywheel_kernels::auto_path_name().to_string()),
    };
    let rows4 = std::env::args().any(|a| a == "rows4");
    println!("path {name} n {n} k {k} m {m} rows4 {rows4}");
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a thread pool");
    let mut s = 1u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u8
    };
    for ty in ALL_TYPES.iter().chain(ALL_TYPES.iter()).copied() {
        if k % ty.block_elems() != 0 {
            continue;
        }
        let bytes = n * k / ty.block_elems() * ty.block_bytes();
        let mut w: Vec<u8> = (0..bytes).map(|_| rnd()).collect();
        // Sane f16 scales (0x1c00 ≈ 0.0039) where every type keeps one.
        let bb = ty.block_bytes();
        let at = if ty == BlockType::Q6K { 208 } else { 0 };
        for b in w.chunks_exact_mut(bb) {
            b[at] = 0;
            b[at + 1] = 0x1c;
            if matches!(
                ty,
                BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q4K | BlockType::Q5K
            ) {
                b[2] = 0;
                b[3] = 0x1c;
            }
        }
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
            .collect();
        let mut out = vec![0f32; m * n];
        let packed;
        let wm = if rows4 && flywheel_kernels::has_rows4(ty) {
            packed = pack_rows4(ty, &w, n);
            QMatrix {
                layout: Layout::Rows4,
                ..QMatrix::ggml(ty, &packed, n, k)
            }
        } else {
            QMatrix::ggml(ty, &w, n, k)
        };
        let iters = (200_000_000 / (n * k * m)).max(3);
        matmul(wm, &x, m, &mut out, path);
        // Timed from a pool thread, as the model calls it (a call from outside the pool waits
        // for a pool thread to wake up and finish, which adds tens of µs of scheduling noise).
        let dt = pool.install(|| {
            let t = Instant::now();
            for _ in 0..iters {
                matmul(wm, &x, m, &mut out, path);
            }
            t.elapsed().as_secs_f64() / iters as f64
        });
        let blocks = (n * k / ty.block_elems() * m) as f64;
        println!(
            "{ty:?}: {:.1} us/call, {:.2} ns/block ({} el), {:.1} GB/s weights, {:.1} GMAC/s",
            dt * 1e6,
            dt * 1e9 / blocks * pool.current_num_threads() as f64,
            ty.block_elems(),
            bytes as f64 / dt / 1e9,
            (n * k * m) as f64 / dt / 1e9
        );
    }
}

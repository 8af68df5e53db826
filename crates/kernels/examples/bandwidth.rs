//! STREAM-style memory bandwidth: `cargo run --release -p flywheel-kernels --example bandwidth`.
//! Copy, triad (a = b + s·c) and read-only sum over arrays far larger than the caches, with the
//! rayon pool's threads (RAYON_NUM_THREADS); prints the best of several passes in GB/s. Decode
//! speed is reported against this as a fraction of the bandwidth floor (weight bytes per token
//! ÷ read bandwidth).
use rayon::prelude::*;
use std::time::Instant;

fn best(passes: usize, bytes: f64, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes / best / 1e9
}

fn main() {
    let n: usize = 32 << 20; // 32 Mi f32 = 128 MiB per array
    let chunk = 1 << 16;
    let mut a = vec![0f32; n];
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let c: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
    let f = 4.0 * n as f64;
    let copy = best(5, 2.0 * f, || {
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk))
            .for_each(|(a, b)| a.copy_from_slice(b))
    });
    let triad = best(5, 3.0 * f, || {
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk).zip(c.par_chunks(chunk)))
            .for_each(|(a, (b, c))| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 3.0 * c;
                }
            })
    });
    let mut sink = 0f32;
    // Read-only: a sum of squares with the AVX2 dot product (the second operand is the same
    // cache line, so DRAM traffic is one array).
    let read = best(5, f, || {
        sink += b
            .par_chunks(chunk)
            .map(|b| flywheel_kernels::dot_f32(b, b))
            .sum::<f32>()
    });
    println!(
        "{{\"threads\":{},\"copy_gb_s\":{copy:.1},\"triad_gb_s\":{triad:.1},\"read_gb_s\":{read:.1},\"sink\":{}}}",
        rayon::current_num_threads(),
        sink > 0.0
    );
}

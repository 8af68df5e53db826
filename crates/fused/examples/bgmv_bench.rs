//! Times `lora_bgmv` against candle's composition (per adapter: gather the rows, two matmuls,
//! scale, scatter-add) on a serving-shaped mixed-adapter batch, and prints one JSON line per
//! shape with the ratio. Runs on the GPU when there is one (scripts/gpu/check.py runs it there),
//! else on the CPU.
//!
//! `cargo run --release -p flywheel-fused --example bgmv_bench [--features cuda]`
use candle_core::{DType, Device, Tensor};
use flywheel_fused::lora_bgmv;
use std::time::Instant;

/// The grouped composition the serving path used before the fused op.
fn grouped(
    z: &Tensor,
    down: &Tensor,
    up: &Tensor,
    scales: &[f32],
    groups: &[Tensor],
) -> candle_core::Result<Tensor> {
    let mut out = Tensor::zeros((z.dim(0)?, up.dim(2)?), z.dtype(), z.device())?;
    for (g, ids) in groups.iter().enumerate() {
        let x = z.index_select(ids, 0)?;
        let y = (x.matmul(&down.get(g)?.t()?)?.matmul(&up.get(g)?)? * scales[g] as f64)?;
        out = out.index_add(ids, &y, 0)?;
    }
    Ok(out)
}

fn time(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut v = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let dev = Device::cuda_if_available(0)?;
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let reps = if dev.is_cpu() { 20 } else { 200 };
    // Qwen2.5-0.5B's up_proj (896 -> 4864) and o_proj (896 -> 896); 4 adapters of rank 16.
    for (n_in, n_out) in [(896, 4864), (896, 896)] {
        for rows in [1usize, 8, 32, 128] {
            let (g, r) = (4usize, 16usize);
            let z = Tensor::randn(0f32, 1.0, (rows, n_in), &dev)?.to_dtype(dtype)?;
            let down = Tensor::randn(0f32, 0.05, (g, r, n_in), &dev)?.to_dtype(dtype)?;
            let up = Tensor::randn(0f32, 0.05, (g, r, n_out), &dev)?.to_dtype(dtype)?;
            let scales_v = vec![2.0f32; g];
            let scales = Tensor::new(scales_v.as_slice(), &dev)?;
            let idx_v: Vec<u32> = (0..rows as u32).map(|i| i % g as u32).collect();
            let idx = Tensor::new(idx_v.as_slice(), &dev)?;
            let groups: Vec<Tensor> = (0..g as u32)
                .map(|a| {
                    let rows: Vec<u32> = (0..idx_v.len() as u32)
                        .filter(|&i| idx_v[i as usize] == a)
                        .collect();
                    Tensor::new(rows.as_slice(), &dev)
                })
                .filter(|t| t.as_ref().map_or(true, |t| t.dim(0).unwrap_or(0) > 0))
                .collect::<candle_core::Result<_>>()?;
            let fused = time(&dev, reps, || lora_bgmv(&z, &down, &up, &scales, &idx))?;
            let reference = time(&dev, reps, || grouped(&z, &down, &up, &scales_v, &groups))?;
            println!(
                "{{\"device\":\"{:?}\",\"dtype\":\"{dtype:?}\",\"rows\":{rows},\"in\":{n_in},\"out\":{n_out},\"adapters\":{g},\"rank\":{r},\"fused_us\":{fused:.1},\"grouped_us\":{reference:.1},\"speedup\":{:.2}}}",
                dev.location(),
                reference / fused
            );
        }
    }
    Ok(())
}

//! The op against candle's composition (gather the rows of each adapter, two matmuls, scale,
//! scatter-add), on `FLYWHEEL_TEST_DEVICE` (the CPU by default; the GPU tests the CUDA kernel).
use super::*;
use candle_core::{Device, Var, D};

fn dev() -> Device {
    flywheel_models::test_device()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Case {
    z: Tensor,
    down: Tensor,
    up: Tensor,
    scales: Tensor,
    idx: Tensor,
    idx_host: Vec<u32>,
}

/// Odd sizes (nothing a multiple of a warp or a block); row 2 and the last row use no adapter;
/// adapter 1 has rank 3 of the padded 5 (its last two rows are zero).
fn case(dtype: DType) -> anyhow::Result<Case> {
    let (t, n_in, n_out, g, r) = (9, 37, 53, 3, 5);
    let d = dev();
    let mut down = values(g * r * n_in, 1);
    for j in 3..r {
        down[(r + j) * n_in..(r + j + 1) * n_in].fill(0.0);
    }
    let idx_host = vec![0, 1, NO_ADAPTER, 2, 2, 0, 1, 0, NO_ADAPTER];
    Ok(Case {
        z: Tensor::from_vec(values(t * n_in, 2), (t, n_in), &d)?.to_dtype(dtype)?,
        down: Tensor::from_vec(down, (g, r, n_in), &d)?.to_dtype(dtype)?,
        up: Tensor::from_vec(values(g * r * n_out, 3), (g, r, n_out), &d)?.to_dtype(dtype)?,
        scales: Tensor::new(&[2.0f32, 0.5, -1.5], &d)?,
        idx: Tensor::new(idx_host.as_slice(), &d)?,
        idx_host,
    })
}

/// candle's composition, in f32 on the case's (rounded) inputs.
fn reference(c: &Case, z: &Tensor) -> anyhow::Result<Tensor> {
    let (t, n_out) = (z.dim(0)?, c.up.dim(2)?);
    let scales = c.scales.to_vec1::<f32>()?;
    let mut out = Tensor::zeros((t, n_out), DType::F32, z.device())?;
    for (g, &s) in scales.iter().enumerate() {
        let rows: Vec<u32> = (0..t as u32)
            .filter(|&i| c.idx_host[i as usize] == g as u32)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let ids = Tensor::new(rows.as_slice(), z.device())?;
        let x = z.to_dtype(DType::F32)?.index_select(&ids, 0)?;
        let a = c.down.get(g)?.to_dtype(DType::F32)?;
        let u = c.up.get(g)?.to_dtype(DType::F32)?;
        let y = (x.matmul(&a.t()?)?.matmul(&u)? * s as f64)?;
        out = out.index_add(&ids, &y, 0)?;
    }
    Ok(out)
}

fn rel_err(got: &Tensor, want: &Tensor) -> anyhow::Result<f32> {
    let norm =
        |t: &Tensor| -> anyhow::Result<f32> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?) };
    Ok(norm(&(got.to_dtype(DType::F32)? - want)?)? / norm(want)?)
}

#[test]
fn bgmv_matches_the_grouped_matmuls_in_every_dtype() -> anyhow::Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
        let c = case(dtype)?;
        let got = lora_bgmv(&c.z, &c.down, &c.up, &c.scales, &c.idx)?;
        assert_eq!((got.dims(), got.dtype()), (&[9usize, 53][..], dtype));
        let want = reference(&c, &c.z)?;
        let e = rel_err(&got, &want)?;
        assert!(e < tol, "{dtype:?}: relative error {e}");
        // Rows without an adapter are exactly zero; the others are not.
        let rows = got
            .to_dtype(DType::F32)?
            .abs()?
            .sum(D::Minus1)?
            .to_vec1::<f32>()?;
        for (i, (&g, &m)) in c.idx_host.iter().zip(&rows).enumerate() {
            assert_eq!(g == NO_ADAPTER, m == 0.0, "{dtype:?} row {i}: |sum| {m}");
        }
    }
    Ok(())
}

/// The input gradient is the same op with the factors' roles swapped, as the docs say.
#[test]
fn swapped_factors_give_the_input_gradient() -> anyhow::Result<()> {
    let c = case(DType::F32)?;
    let z = Var::from_tensor(&c.z)?;
    let dy = Tensor::from_vec(values(9 * 53, 4), (9, 53), z.device())?;
    let loss = (reference(&c, z.as_tensor())? * &dy)?.sum_all()?;
    let want = loss
        .backward()?
        .get(z.as_tensor())
        .expect("z's gradient")
        .clone();
    let got = lora_bgmv(&dy, &c.up, &c.down, &c.scales, &c.idx)?;
    let e = rel_err(&got, &want)?;
    assert!(e < 1e-5, "relative error {e}");
    Ok(())
}

#[test]
fn bad_shapes_and_indices_are_named() -> anyhow::Result<()> {
    let c = case(DType::F32)?;
    let e = lora_bgmv(&c.z, &c.up, &c.down, &c.scales, &c.idx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit"), "{e}");
    let e = lora_bgmv(&c.z, &c.down, &c.up, &c.scales.narrow(0, 0, 2)?, &c.idx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scales must be (3,)"), "{e}");
    let bf = c.up.to_dtype(DType::BF16)?;
    let e = lora_bgmv(&c.z, &c.down, &bf, &c.scales, &c.idx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a dtype"), "{e}");
    if c.z.device().is_cpu() {
        let bad = Tensor::new(&[0u32, 1, 7, 0, 0, 0, 0, 0, 0], c.z.device())?;
        let e = lora_bgmv(&c.z, &c.down, &c.up, &c.scales, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 2 names adapter 7 of 3"), "{e}");
    }
    Ok(())
}

//! Kernel tests: SIMD against scalar, scalar against the exact product of the dequantized
//! weights, batch rows against the same rows alone, and thread-count determinism.

use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn byte(seed: &mut u64) -> u8 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u8
}

/// `n × k` random but valid blocks of `ty`: random quant bits, sane f16 scales and minimums.
fn random_weights(ty: BlockType, n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
    let bb = ty.block_bytes();
    let blocks = n * k / ty.block_elems();
    let mut out: Vec<u8> = (0..blocks * bb).map(|_| byte(seed)).collect();
    for b in out.chunks_exact_mut(bb) {
        let mut put =
            |at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        let d = 0.002 + 0.01 * lcg(seed).abs();
        let m = 0.05 * lcg(seed);
        match ty {
            BlockType::Q6K => put(208, d),
            BlockType::Q4_1 | BlockType::Q5_1 => {
                put(0, d);
                put(2, m);
            }
            BlockType::Q4K | BlockType::Q5K => {
                put(0, d);
                put(2, m.abs());
            }
            _ => put(0, d),
        }
    }
    out
}

/// Random activations with an outlier, as real activations have.
fn random_x(m: usize, k: usize, seed: &mut u64) -> Vec<f32> {
    let mut x: Vec<f32> = (0..m * k).map(|_| lcg(seed) * 3.0).collect();
    x[7] = 250.0;
    x
}

#[test]
fn every_type_simd_equals_scalar_and_both_track_the_dequantized_product() {
    let mut seed = 1;
    for ty in ALL_TYPES {
        // Odd sizes: n not a multiple of any task width, m = a four-row pass plus one.
        let (m, n, k) = (5, 37, 3 * ty.block_elems());
        let wq = random_weights(ty, n, k, &mut seed);
        let x = random_x(m, k, &mut seed);
        let wm = QMatrix {
            ty,
            data: &wq,
            n,
            k,
            layout: Layout::Ggml,
        };
        let mut a = vec![0f32; m * n];
        let mut b = vec![0f32; m * n];
        matmul(wm, &x, m, &mut a, Path::Auto);
        matmul(wm, &x, m, &mut b, Path::Scalar);
        let wd = dequantize(ty, &wq);
        assert_eq!(wd.len(), n * k);
        let be = ty.block_elems();
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[i * k + t] * wd[j * k + t]).sum();
                let (ai, bi) = (a[i * n + j], b[i * n + j]);
                let scale: f32 = (0..k).map(|t| (x[i * k + t] * wd[j * k + t]).abs()).sum();
                assert!(
                    (ai - bi).abs() <= 1e-5 * (1.0 + scale),
                    "{ty:?} ({i},{j}) simd {ai} vs scalar {bi}"
                );
                // Rounding each activation to its block's step d_x moves it by at most d_x / 2.
                let bound: f32 = (0..k / be)
                    .map(|b| {
                        let xs = &x[i * k + b * be..i * k + (b + 1) * be];
                        let dx = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                        let ws: f32 = wd[j * k + b * be..j * k + (b + 1) * be]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        0.5 * dx * ws * 1.01
                    })
                    .sum();
                assert!(
                    (bi - exact).abs() <= bound + 1e-3 * (1.0 + scale),
                    "{ty:?} ({i},{j}): {bi} vs exact {exact}, bound {bound}"
                );
            }
        }
        // Row independence (the server's batched answers equal the same requests alone): each
        // row alone equals that row in the batch, bit for bit, whether the batch ran it in a
        // four-row pass or on its own.
        for i in 0..m {
            let mut one = vec![0f32; n];
            matmul(wm, &x[i * k..(i + 1) * k], 1, &mut one, Path::Auto);
            assert_eq!(&one[..], &a[i * n..(i + 1) * n], "{ty:?} row {i}");
        }
    }
}

#[test]
fn one_row_kernels_equal_the_avx2_path_bit_for_bit() {
    // One activation row goes to the VNNI row kernels where the CPU has VNNI (four weight rows a
    // pass, a short last group padded); `Path::Baseline` runs the row-at-a-time AVX2 kernel. Every
    // row count up to three groups, so each padding case is hit. (On a CPU without VNNI both
    // calls take the same path and the test only checks that the result is not empty.)
    let mut seed = 11;
    for ty in ALL_TYPES.into_iter().filter(|t| !t.is_k()) {
        for n in 1..=12 {
            let k = 5 * ty.block_elems();
            let wq = random_weights(ty, n, k, &mut seed);
            let x = random_x(1, k, &mut seed);
            let wm = QMatrix {
                ty,
                data: &wq,
                n,
                k,
                layout: Layout::Ggml,
            };
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            matmul(wm, &x, 1, &mut a, Path::Auto);
            matmul(wm, &x, 1, &mut b, Path::Baseline);
            assert!(a.iter().any(|v| *v != 0.0), "{ty:?} n={n}: all zero");
            assert_eq!(a, b, "{ty:?} n={n}: {} vs avx2", crate::auto_path_name());
            // Each VNNI flavour this CPU has, called directly (Auto picks only one).
            #[cfg(target_arch = "x86_64")]
            for (flavour, have) in [
                (
                    crate::x86::Vnni::Avx,
                    is_x86_feature_detected!("avxvnni") && crate::have_avx2(),
                ),
                (
                    crate::x86::Vnni::Avx512,
                    crate::have_vnni() == Some(crate::x86::Vnni::Avx512),
                ),
            ] {
                if !have {
                    continue;
                }
                let mut xq = vec![crate::Q8Block::default(); k / crate::QK];
                crate::quantize_row(&x, &mut xq, true);
                let mut c = vec![0f32; n];
                let mut sums = vec![];
                crate::lane_sums(&xq, &mut sums);
                crate::x86::rows32(ty, flavour)(&wq, 0, &xq, &sums, &mut c, 1);
                assert_eq!(c, b, "{ty:?} n={n}: {flavour:?} vs avx2");
                // The same rows repacked into groups of four (and a ggml tail).
                let packed = pack_rows4(ty, &wq, n);
                let mut p = vec![0f32; n];
                crate::x86::rows32(ty, flavour)(&packed, n / 4 * 4, &xq, &sums, &mut p, 1);
                assert_eq!(p, b, "{ty:?} n={n}: {flavour:?} on Rows4 vs avx2");
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut seed = 7;
    for ty in ALL_TYPES {
        let (n, k) = (301, 2 * ty.block_elems());
        let wq = random_weights(ty, n, k, &mut seed);
        let wm = QMatrix {
            ty,
            data: &wq,
            n,
            k,
            layout: Layout::Ggml,
        };
        for m in [1usize, 6] {
            let x = random_x(m, k, &mut seed);
            let outs: Vec<Vec<f32>> = [1usize, 2, 3]
                .iter()
                .map(|&t| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .unwrap();
                    let mut out = vec![0f32; m * n];
                    pool.install(|| matmul(wm, &x, m, &mut out, Path::Auto));
                    out
                })
                .collect();
            assert!(outs[0].iter().any(|v| *v != 0.0), "{ty:?}: all zero");
            assert_eq!(outs[0], outs[1], "{ty:?} m={m}: 1 vs 2 threads");
            assert_eq!(outs[0], outs[2], "{ty:?} m={m}: 1 vs 3 threads");
        }
    }
}

#[test]
fn matmul_many_equals_each_matmul_alone() {
    let mut seed = 5;
    // Mixed types in one call (a Q4_K_M layer mixes Q5_0, Q8_0, Q4_K and Q6_K): k = 512 fits both
    // block sizes.
    let k = 512;
    let tys = [
        BlockType::Q5_0,
        BlockType::Q4_1,
        BlockType::Q4K,
        BlockType::Q6K,
        BlockType::Q8_0,
    ];
    let ns = [40usize, 17, 33, 9, 64];
    let ws: Vec<Vec<u8>> = tys
        .iter()
        .zip(ns)
        .map(|(&ty, n)| random_weights(ty, n, k, &mut seed))
        .collect();
    for m in [1usize, 5] {
        let x = random_x(m, k, &mut seed);
        let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
        let mut products: Vec<Product> = outs
            .iter_mut()
            .enumerate()
            .map(|(i, out)| Product {
                w: QMatrix {
                    ty: tys[i],
                    data: &ws[i],
                    n: ns[i],
                    k,
                    layout: Layout::Ggml,
                },
                out: &mut out[..],
            })
            .collect();
        matmul_many(&mut products, &x, m, Path::Auto);
        for (i, out) in outs.iter().enumerate() {
            let mut alone = vec![0f32; m * ns[i]];
            let w = QMatrix {
                ty: tys[i],
                data: &ws[i],
                n: ns[i],
                k,
                layout: Layout::Ggml,
            };
            matmul(w, &x, m, &mut alone, Path::Auto);
            assert_eq!(out, &alone, "{:?} m={m}", tys[i]);
        }
    }
}

#[test]
fn activation_quantization_matches_llama_cpp_rules() {
    let mut x = [0f32; QK];
    x[0] = 1.0;
    x[1] = -0.5; // -0.5 * 127 = -63.5 → ties to even: -64
    x[2] = 2.0 / 254.0; // 1/127 of the max → exactly 1
    x[3] = 1.5 / 127.0; // 1.5 → 2 (tie to even)
    x[4] = 2.5 / 127.0; // 2.5 → 2 (tie to even)
    let mut out = [Q8Block::default()];
    quantize_row(&x, &mut out, true);
    assert_eq!(&out[0].qs[..5], &[127, -64, 1, 2, 2]);
    let d = 1.0f32 / 127.0;
    assert_eq!(out[0].d, f16::from_f32(d).to_f32());
    let sum = (127 - 64 + 1 + 2 + 2) as f32;
    assert_eq!(out[0].s, f16::from_f32(d * sum).to_f32());
}

#[test]
fn k_activation_quantization_keeps_the_sign_of_the_largest_and_the_sums() {
    let mut x = [0f32; QK_K];
    x[0] = 0.5;
    x[1] = -1.0; // the largest magnitude is negative: iscale = -127 / -1 = 127
    x[2] = 0.25; // 31.75 → 32
    x[20] = 2.5 / 127.0; // 2.5 → 2 (tie to even)
    let mut out = [Q8KBlock::default()];
    quantize_row_k(&x, &mut out);
    assert_eq!(&out[0].qs[..3], &[64, -127, 32]);
    assert_eq!(out[0].qs[20], 2);
    assert_eq!(out[0].d, 1.0 / 127.0);
    assert_eq!(out[0].bsums[0], 64 - 127 + 32);
    assert_eq!(out[0].bsums[1], 2);
    // A zero block stays zero (no division by zero).
    let mut z = [Q8KBlock::default()];
    quantize_row_k(&[0.0; QK_K], &mut z);
    assert_eq!(z[0].d, 0.0);
    assert!(z[0].qs.iter().all(|&q| q == 0));
}

#[test]
fn simd_dequantization_equals_scalar() {
    let mut seed = 3;
    for ty in ALL_TYPES {
        let wq = random_weights(ty, 3, 2 * ty.block_elems(), &mut seed);
        let mut fast = vec![0f32; 6 * ty.block_elems()];
        dequantize_into(ty, &wq, &mut fast);
        let mut slow = vec![0f32; fast.len()];
        scalar::dequantize_into(ty, &wq, &mut slow);
        assert_eq!(fast, slow, "{ty:?}");
        assert!(fast.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn dequantization_follows_the_ggml_layouts() {
    // Q5_0: d = 1, element 0 has nibble 3 and its fifth bit set → 3 + 16 − 16 = 3;
    // element 16 has nibble 2 and no fifth bit → 2 − 16 = −14.
    let mut b = vec![0u8; 22];
    b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    b[2] = 1; // bit 0
    b[6] = 0x23; // element 0: 3, element 16: 2
    let v = dequantize(BlockType::Q5_0, &b);
    assert_eq!((v[0], v[16], v[1]), (3.0, -14.0, -16.0));
    // Q6_K: d = 1, scale 0 = 2, element 0 = ql low nibble 5 | qh bits 0..1 = 1 → 21 − 32 = −11.
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    b[192] = 2;
    b[0] = 5;
    b[128] = 1;
    let v = dequantize(BlockType::Q6K, &b);
    assert_eq!(v[0], -22.0);
    // Q4_K: d = 1, dmin = 1, sub-block 0 scale 3 and min 1; element 0 nibble 7 → 3·7 − 1 = 20.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    b[4] = 3;
    b[8] = 1;
    b[16] = 7;
    let v = dequantize(BlockType::Q4K, &b);
    assert_eq!((v[0], v[32]), (20.0, 0.0));
}

#[test]
fn dot_f32_matches_a_plain_sum() {
    for n in [0usize, 1, 7, 8, 31, 32, 33, 384, 385] {
        let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        let got = dot_f32(&a, &b) as f64;
        assert!(
            (got - want).abs() < 1e-3 * (1.0 + want.abs()),
            "n={n}: {got} vs {want}"
        );
    }
}

#[test]
fn axpy_f32_matches_a_plain_loop() {
    for n in [0usize, 3, 8, 19, 64] {
        let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut y: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
        let want: Vec<f32> = y.iter().zip(&x).map(|(y, x)| y + 1.5 * x).collect();
        axpy_f32(1.5, &x, &mut y);
        assert_eq!(y, want, "n={n}");
    }
}

#[test]
fn attention_head_simd_matches_scalar_and_a_softmax_in_f64() {
    let mut seed = 11;
    for (d, len) in [(64usize, 1usize), (64, 37), (128, 70), (24, 9), (12, 5)] {
        let q: Vec<f32> = (0..d).map(|_| lcg(&mut seed)).collect();
        let k: Vec<f32> = (0..len * d).map(|_| lcg(&mut seed) * 4.0).collect();
        let v: Vec<f32> = (0..len * d).map(|_| lcg(&mut seed)).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; d];
        attention_head(&q, &k, &v, scale, &mut out);
        let mut s = vec![0f32; len];
        let mut scalar = vec![0f32; d];
        attention_head_scalar(&q, &k, &v, scale, &mut s, &mut scalar);
        // f64 reference.
        let sc: Vec<f64> = (0..len)
            .map(|p| {
                (0..d)
                    .map(|i| q[i] as f64 * k[p * d + i] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = sc.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..d {
            let want: f64 = (0..len).map(|p| e[p] / z * v[p * d + i] as f64).sum();
            assert!(
                (out[i] as f64 - want).abs() < 1e-5,
                "d={d} len={len} simd {} vs {want}",
                out[i]
            );
            assert!(
                (scalar[i] as f64 - want).abs() < 1e-5,
                "d={d} len={len} scalar"
            );
        }
    }
}

#[test]
#[cfg(target_arch = "aarch64")]
fn neon_kernels_equal_the_scalar_path_bit_for_bit() {
    // Each block's integer product is exact and the f32 accumulation is the scalar code's
    // expression in its order, so NEON with `sdot` (Auto, where the CPU has it), NEON without it
    // (Baseline) and the scalar code agree exactly: one row, a four-row pass, and a pass plus
    // a remainder. scripts/test-aarch64.sh names the path it expects of the emulated CPU.
    if let Ok(want) = std::env::var("FLYWHEEL_EXPECT_KERNEL_PATH") {
        assert_eq!(auto_path_name(), want);
    }
    let mut seed = 13;
    for ty in ALL_TYPES {
        let (n, k) = (19, 3 * ty.block_elems());
        let wq = random_weights(ty, n, k, &mut seed);
        let wm = QMatrix {
            ty,
            data: &wq,
            n,
            k,
            layout: Layout::Ggml,
        };
        for m in [1usize, 4, 6] {
            let x = random_x(m, k, &mut seed);
            let run = |path| {
                let mut out = vec![0f32; m * n];
                matmul(wm, &x, m, &mut out, path);
                out
            };
            let scalar = run(Path::Scalar);
            assert!(scalar.iter().any(|v| *v != 0.0), "{ty:?}: all zero");
            assert_eq!(
                run(Path::Auto),
                scalar,
                "{ty:?} m={m}: {}",
                auto_path_name()
            );
            assert_eq!(run(Path::Baseline), scalar, "{ty:?} m={m}: neon");
        }
    }
}

#[test]
fn rows4_repacking_round_trips_and_every_path_reads_it_bit_for_bit() {
    // Row counts around the groups of four (a tail of 1–3 ggml rows, no whole group, several
    // tasks), activation rows for the VNNI decode kernels (1) and the row-by-row kernels (2, 5),
    // and thread counts that split the rows differently.
    let mut seed = 17;
    for ty in ALL_TYPES.into_iter().filter(|&t| has_rows4(t)) {
        for n in [1usize, 3, 4, 5, 8, 13, 37, 70] {
            let k = 3 * ty.block_elems();
            let wq = random_weights(ty, n, k, &mut seed);
            let packed = pack_rows4(ty, &wq, n);
            assert_eq!(unpack_rows4(ty, &packed, n), wq, "{ty:?} n={n}: round trip");
            if n >= 4 {
                assert_ne!(packed, wq, "{ty:?} n={n}: packing moved nothing");
            }
            let ggml = QMatrix::ggml(ty, &wq, n, k);
            let rows4 = QMatrix {
                data: &packed,
                layout: Layout::Rows4,
                ..ggml
            };
            // Dequantized rows and block ranges read the same values in both layouts.
            for r in 0..n {
                let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                dequantize_row_blocks(&ggml, r, 0, &mut a);
                dequantize_row_blocks(&rows4, r, 0, &mut b);
                assert_eq!(a, b, "{ty:?} n={n} row {r}");
                let mut c = vec![0f32; ty.block_elems()];
                dequantize_row_blocks(&rows4, r, 2, &mut c);
                assert_eq!(&c[..], &a[2 * ty.block_elems()..], "{ty:?} row {r} block 2");
            }
            for m in [1usize, 2, 5] {
                let x = random_x(m, k, &mut seed);
                let mut wants = vec![];
                for path in [Path::Auto, Path::Baseline, Path::Scalar] {
                    let mut want = vec![0f32; m * n];
                    matmul(ggml, &x, m, &mut want, path);
                    assert!(want.iter().any(|v| *v != 0.0), "{ty:?}: all zero");
                    wants.push(want.clone());
                    for threads in [1usize, 2, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let mut got = vec![0f32; m * n];
                        pool.install(|| matmul(rows4, &x, m, &mut got, path));
                        assert_eq!(got, want, "{ty:?} n={n} m={m} {path:?} {threads} threads");
                    }
                }
                // The VNNI row kernels (Auto, where the CPU has them, one pass per activation
                // row) equal the AVX2 four-row kernel bit for bit.
                assert_eq!(wants[0], wants[1], "{ty:?} n={n} m={m}: auto vs baseline");
            }
        }
    }
}

#[test]
fn rows4_is_refused_for_the_k_quants() {
    let mut seed = 19;
    let wq = random_weights(BlockType::Q4K, 4, QK_K, &mut seed);
    assert!(!has_rows4(BlockType::Q4K));
    assert!(std::panic::catch_unwind(|| pack_rows4(BlockType::Q4K, &wq, 4)).is_err());
    let w = QMatrix {
        layout: Layout::Rows4,
        ..QMatrix::ggml(BlockType::Q4K, &wq, 4, QK_K)
    };
    let x = random_x(1, QK_K, &mut seed);
    let mut out = vec![0f32; 4];
    assert!(std::panic::catch_unwind(move || matmul(w, &x, 1, &mut out, Path::Auto)).is_err());
}

#[test]
fn long_rows_with_several_activation_rows_equal_the_avx2_kernel() {
    // Rows of 8192 values: a task's weight rows are split into L1-sized chunks of four rows,
    // each chunk passed once per activation row. Both layouts, bit for bit the AVX2 kernel.
    let mut seed = 23;
    for ty in ALL_TYPES.into_iter().filter(|&t| has_rows4(t)) {
        let (n, k, m) = (37, 8192, 3);
        let wq = random_weights(ty, n, k, &mut seed);
        let packed = pack_rows4(ty, &wq, n);
        let ggml = QMatrix::ggml(ty, &wq, n, k);
        let rows4 = QMatrix {
            data: &packed,
            layout: Layout::Rows4,
            ..ggml
        };
        let x = random_x(m, k, &mut seed);
        let run = |w: QMatrix, path| {
            let mut out = vec![0f32; m * n];
            matmul(w, &x, m, &mut out, path);
            out
        };
        let want = run(ggml, Path::Baseline);
        assert!(want.iter().any(|v| *v != 0.0), "{ty:?}: all zero");
        assert_eq!(run(ggml, Path::Auto), want, "{ty:?} ggml");
        assert_eq!(run(rows4, Path::Auto), want, "{ty:?} rows4");
    }
}

#[test]
fn k_quant_gemm_equals_the_scalar_path_bit_for_bit() {
    let k_types: Vec<BlockType> = ALL_TYPES.into_iter().filter(|t| t.is_k()).collect();
    assert_eq!(k_types.len(), 3);
    if !k_types.iter().all(|&t| has_gemm_k(t)) {
        assert!(k_types.iter().all(|&t| !has_gemm_k(t)));
        skip(
            "k_quant_gemm_equals_the_scalar_path_bit_for_bit",
            "this CPU has no AVX-512 VNNI, so gemm_k never runs here",
        );
        return;
    }
    assert!(
        !has_gemm_k(BlockType::Q4_0),
        "gemm_k is for the K-quants only"
    );
    let mut seed = 7;
    for ty in k_types {
        // n: two full panels and a tail of 5; m: every row-group size (8, 4, 2, 1) and a tail.
        for (m, n) in [(1, 3), (15, 37), (23, 16)] {
            let k = 3 * QK_K;
            let wq = random_weights(ty, n, k, &mut seed);
            let x = random_x(m, k, &mut seed);
            let wm = QMatrix::ggml(ty, &wq, n, k);
            let mut want = vec![0f32; m * n];
            matmul(wm, &x, m, &mut want, Path::Scalar);
            let mut got = vec![f32::NAN; m * n];
            gemm_k(wm, &x, m, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{ty:?} ({m}, {n}) at {i}: {g} vs {w}"
                );
            }
            // The same bits on one thread.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut one = vec![0f32; m * n];
            pool.install(|| gemm_k(wm, &x, m, &mut one));
            assert_eq!(one, got, "{ty:?}: thread count changed the result");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_q8_k_quantization_equals_the_scalar_one() {
    if !has_gemm_k(BlockType::Q4K) {
        skip(
            "avx512_q8_k_quantization_equals_the_scalar_one",
            "this CPU has no AVX-512 VNNI",
        );
        return;
    }
    let mut seed = 3;
    let mut x = random_x(4, 4 * QK_K, &mut seed);
    // Ties of magnitude with both signs (the first sets the sign), a zero block, halves that
    // round to even, and a value that rounds past 127 before the clamp.
    x[300] = -250.0;
    x[2 * QK_K..3 * QK_K].fill(0.0);
    x[3 * QK_K] = 2.0;
    x[3 * QK_K + 1] = -2.0;
    x[3 * QK_K + 2] = 2.0 * 0.5 / 127.0;
    x[3 * QK_K + 3] = 2.0 * 1.5 / 127.0;
    let mut a = vec![Q8KBlock::default(); x.len() / QK_K];
    let mut b = a.clone();
    quantize_row_k(&x, &mut a);
    // SAFETY: has_gemm_k checked AVX-512.
    #[allow(unsafe_code)]
    unsafe {
        gemm_k::quantize_row_k(&x, &mut b)
    };
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.qs, b.qs, "block {i}");
        assert_eq!(a.bsums, b.bsums, "block {i}");
        assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}");
    }
}

/// Reports a test this CPU cannot run: to stderr, and as a line of the file `FLYWHEEL_SKIP_LOG`
/// names (scripts/test.sh counts and prints them; cargo can only report the test as passed).
/// The kernels crate sits below the runtime, so this mirrors `flywheel_runtime::testing::skip`.
fn skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
    if let Ok(path) = std::env::var("FLYWHEEL_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

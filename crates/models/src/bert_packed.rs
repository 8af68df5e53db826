//! A packed BERT encoder for the CPU in f32: the sequences of a batch are concatenated (no
//! padding, no mask), every projection is one large GEMM over all tokens (Q, K and V fused),
//! and attention runs per (sequence, head) in parallel, each a pair of small GEMMs.
//!
//! Same arithmetic as candle-transformers' BERT (post-LayerNorm, exact-erf GELU), so vectors
//! agree with it and with sentence-transformers to about 1e-6; it exists because candle's
//! batched matmuls over padded `(batch, seq, hidden)` tensors run at a fraction of the
//! machine's GEMM speed.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::cpu::{exp_fast, multiversion, small_gemm, softmax, sum8, SendPtr};
use crate::{Error, Result};

struct Dense {
    /// `(out, in)` row-major.
    w: Vec<f32>,
    b: Vec<f32>,
    in_dim: usize,
    out_dim: usize,
}

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

/// The encoder's weights as plain f32 arrays.
pub struct PackedBert {
    word: Vec<f32>,
    pos: Vec<f32>,
    types: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    max_pos: usize,
    type_vocab: usize,
}

fn get(vb: &VarBuilder, name: &str) -> Result<Vec<f32>> {
    let t: Tensor = vb
        .get_unchecked_dtype(name, DType::F32)
        .map_err(|e| Error::BadFile {
            file: "(bert weights)".into(),
            reason: format!("tensor {name}: {e}"),
        })?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn norm(vb: &VarBuilder, prefix: &str) -> Result<Norm> {
    let (g, b) = if vb.contains_tensor(&format!("{prefix}.weight")) {
        ("weight", "bias")
    } else {
        ("gamma", "beta")
    };
    Ok(Norm {
        g: get(vb, &format!("{prefix}.{g}"))?,
        b: get(vb, &format!("{prefix}.{b}"))?,
    })
}

fn dense(vb: &VarBuilder, prefix: &str, in_dim: usize) -> Result<Dense> {
    let w = get(vb, &format!("{prefix}.weight"))?;
    let b = get(vb, &format!("{prefix}.bias"))?;
    let out_dim = b.len();
    if w.len() != out_dim * in_dim {
        return Err(Error::BadFile {
            file: "(bert weights)".into(),
            reason: format!(
                "{prefix}.weight has {} values, expected {out_dim}×{in_dim}",
                w.len()
            ),
        });
    }
    Ok(Dense {
        w,
        b,
        in_dim,
        out_dim,
    })
}

/// `y[n × out] = x[n × in] · Wᵀ + b`, one multi-threaded GEMM.
fn linear(x: &[f32], n: usize, d: &Dense, y: &mut Vec<f32>) {
    y.clear();
    y.reserve(n * d.out_dim);
    for _ in 0..n {
        y.extend_from_slice(&d.b);
    }
    let threads = rayon::current_num_threads();
    // SAFETY: all pointers cover the matrices described by the sizes and strides; dst does not alias.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            n,
            d.out_dim,
            d.in_dim,
            y.as_mut_ptr(),
            1,
            d.out_dim as isize,
            true,
            x.as_ptr(),
            1,
            d.in_dim as isize,
            d.w.as_ptr(),
            d.in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 && n >= 16 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

multiversion! {
/// LayerNorm of one row in place: `(x − mean) / sqrt(var + eps) · g + b`.
fn norm_row(row: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
    let width = row.len();
    let mean = sum8(row) / width as f32;
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += (c[k] - mean) * (c[k] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>())
        / width as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(g).zip(b) {
        *v = (*v - mean) * inv * g + b;
    }
}
}

fn layer_norm(x: &mut [f32], width: usize, n: &Norm, eps: f32) {
    x.par_chunks_mut(width).for_each(|row| {
        norm_row(row, &n.g, &n.b, eps);
    });
}

/// erf with |error| < 1e-6 (Numerical Recipes' erfc Chebyshev fit, evaluated in f32).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp_fast(
        -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))),
    );
    (1.0 - r).copysign(x)
}

fn gelu(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(gelu_chunk);
}

multiversion! {
/// GELU (erf form) in place.
fn gelu_chunk(c: &mut [f32]) {
    for v in c {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}
}

impl PackedBert {
    /// Reads the weights of a BERT checkpoint (names as in Hugging Face's `BertModel`, with or
    /// without a `bert.` prefix).
    pub fn load(vb: VarBuilder, cfg: &serde_json::Value) -> Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let hidden = num("hidden_size").ok_or_else(|| Error::BadFile {
            file: "config.json".into(),
            reason: "hidden_size missing".into(),
        })?;
        let heads = num("num_attention_heads").unwrap_or(12);
        let n_layers = num("num_hidden_layers").unwrap_or(12);
        let act = cfg
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(Error::BadFile {
                file: "config.json".into(),
                reason: format!("hidden_act {act} (the packed encoder implements gelu)"),
            });
        }
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-12) as f32;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("encoder.layer.{i}");
            let q = dense(&vb, &format!("{p}.attention.self.query"), hidden)?;
            let k = dense(&vb, &format!("{p}.attention.self.key"), hidden)?;
            let v = dense(&vb, &format!("{p}.attention.self.value"), hidden)?;
            let qkv = Dense {
                w: [q.w, k.w, v.w].concat(),
                b: [q.b, k.b, v.b].concat(),
                in_dim: hidden,
                out_dim: 3 * hidden,
            };
            let attn_out = dense(&vb, &format!("{p}.attention.output.dense"), hidden)?;
            let attn_norm = norm(&vb, &format!("{p}.attention.output.LayerNorm"))?;
            let inter = dense(&vb, &format!("{p}.intermediate.dense"), hidden)?;
            let out = dense(&vb, &format!("{p}.output.dense"), inter.out_dim)?;
            let out_norm = norm(&vb, &format!("{p}.output.LayerNorm"))?;
            layers.push(Layer {
                qkv,
                attn_out,
                attn_norm,
                inter,
                out,
                out_norm,
            });
        }
        let pos = get(&vb, "embeddings.position_embeddings.weight")?;
        let types = get(&vb, "embeddings.token_type_embeddings.weight")?;
        Ok(Self {
            word: get(&vb, "embeddings.word_embeddings.weight")?,
            max_pos: pos.len() / hidden,
            type_vocab: types.len() / hidden,
            pos,
            types,
            emb_norm: norm(&vb, "embeddings.LayerNorm")?,
            layers,
            hidden,
            heads,
            eps,
        })
    }

    /// The hidden states of every token of every sequence, packed: `Σ len × hidden`.
    /// `seqs` holds `(token ids, token type ids)` per sequence.
    pub fn forward(&self, seqs: &[(&[u32], &[u32])]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let n: usize = seqs.iter().map(|s| s.0.len()).sum();
        let vocab = self.word.len() / h;
        let mut x = vec![0f32; n * h];
        let mut offsets = Vec::with_capacity(seqs.len());
        let mut o = 0;
        for (ids, tys) in seqs {
            if ids.len() > self.max_pos {
                return Err(Error::BadFile {
                    file: "(input)".into(),
                    reason: format!("{} tokens, more than {} positions", ids.len(), self.max_pos),
                });
            }
            for (p, (&id, &ty)) in ids.iter().zip(tys.iter()).enumerate() {
                let (id, ty) = (id as usize, ty as usize);
                if id >= vocab || ty >= self.type_vocab {
                    return Err(Error::BadFile {
                        file: "(input)".into(),
                        reason: format!("token id {id} / type {ty} out of range"),
                    });
                }
                let row = &mut x[(o + p) * h..(o + p + 1) * h];
                let (w, ps, t) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.pos[p * h..(p + 1) * h],
                    &self.types[ty * h..(ty + 1) * h],
                );
                for j in 0..h {
                    row[j] = w[j] + t[j] + ps[j];
                }
            }
            offsets.push((o, ids.len()));
            o += ids.len();
        }
        layer_norm(&mut x, h, &self.emb_norm, self.eps);
        let mut qkv = Vec::new();
        let mut ctx = vec![0f32; n * h];
        let mut tmp = Vec::new();
        let mut inter = Vec::new();
        let heads = self.heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        for layer in &self.layers {
            linear(&x, n, &layer.qkv, &mut qkv);
            let tasks: Vec<(usize, usize, usize)> = offsets
                .iter()
                .flat_map(|&(o, t)| (0..heads).map(move |hd| (o, t, hd)))
                .collect();
            let ctx_ptr = SendPtr(ctx.as_mut_ptr());
            let qkv_ref = &qkv;
            tasks
                .par_iter()
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, &(o, t, hd)| {
                    scores.clear();
                    scores.resize(t * t, 0.0);
                    let row = 3 * h;
                    let q = qkv_ref[o * row + hd * d..].as_ptr();
                    let k = qkv_ref[o * row + h + hd * d..].as_ptr();
                    let v = qkv_ref[o * row + 2 * h + hd * d..].as_ptr();
                    // SAFETY: q/k/v/ctx point at this sequence's rows and this head's columns; each
                    // task's ctx region is disjoint from every other task's.
                    #[allow(unsafe_code)]
                    unsafe {
                        // scores[t × t] = scale · Q_h · K_hᵀ
                        small_gemm(
                            (t, t, d),
                            scores.as_mut_ptr(),
                            t,
                            q,
                            row,
                            k,
                            (1, row),
                            scale,
                        );
                        for r in scores.chunks_mut(t) {
                            softmax(r);
                        }
                        // ctx_h[t × d] = P · V_h
                        small_gemm(
                            (t, d, t),
                            ctx_ptr.get().add(o * h + hd * d),
                            h,
                            scores.as_ptr(),
                            t,
                            v,
                            (row, 1),
                            1.0,
                        );
                    }
                });
            linear(&ctx, n, &layer.attn_out, &mut tmp);
            tmp.par_iter_mut()
                .zip(x.par_iter())
                .for_each(|(a, b)| *a += b);
            layer_norm(&mut tmp, h, &layer.attn_norm, self.eps);
            std::mem::swap(&mut x, &mut tmp); // x = attention block output
            linear(&x, n, &layer.inter, &mut inter);
            gelu(&mut inter);
            linear(&inter, n, &layer.out, &mut tmp);
            tmp.par_iter_mut()
                .zip(x.par_iter())
                .for_each(|(a, b)| *a += b);
            layer_norm(&mut tmp, h, &layer.out_norm, self.eps);
            std::mem::swap(&mut x, &mut tmp);
        }
        Ok(x)
    }
}

/// True when the packed encoder can serve this device and dtype.
pub fn usable(device: &Device, dtype: DType) -> bool {
    matches!(device, Device::Cpu) && dtype == DType::F32
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f64 / 100.0;
            // Reference by series/continued fraction through f64 libm-free identity: erf via high-precision sum.
            let reference = {
                // Maclaurin series, converges well for |x| <= 4 in f64 with enough terms.
                let mut sum = 0.0f64;
                let mut term = x;
                let mut k = 0.0f64;
                while k < 200.0 {
                    sum += term / (2.0 * k + 1.0);
                    k += 1.0;
                    term *= -x * x / k;
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            };
            assert!(
                (erf(x as f32) as f64 - reference).abs() < 1e-6,
                "x={x}: {} vs {reference}",
                erf(x as f32)
            );
        }
    }

    #[test]
    fn exp_fast_is_accurate() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (super::exp_fast(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 5e-7, "x={x}: {got} vs {want}");
        }
        // Outside the normal range it saturates like e^x: no denormals below, +inf above.
        for x in [-87.5f32, -1000.0, f32::NEG_INFINITY] {
            assert_eq!(super::exp_fast(x), 0.0, "x={x}");
        }
        for x in [88.5f32, 1000.0, f32::INFINITY] {
            assert_eq!(super::exp_fast(x), f32::INFINITY, "x={x}");
        }
        // Masked softmax entries come out exactly zero.
        let mut row = vec![0.5f32, f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY, 2.0];
        super::softmax(&mut row);
        assert_eq!((row[1], row[3]), (0.0, 0.0));
        assert!(row.iter().all(|v| v.is_normal() || *v == 0.0), "{row:?}");
    }

    /// The dispatched (widest-vector) softmax, GELU and LayerNorm against f64 references, on an
    /// odd length so the vector loops' tails run too.
    #[test]
    fn vector_element_wise_ops_match_f64_references() {
        let x: Vec<f32> = (0..203)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut s = x.clone();
        super::softmax(&mut s);
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        for (&v, &got) in x.iter().zip(&s) {
            let want = (v as f64 - m).exp() / z;
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want + 1e-12,
                "softmax({v}): {got} vs {want}"
            );
        }
        let mut g = x.clone();
        super::gelu_chunk(&mut g);
        for (&v, &got) in x.iter().zip(&g) {
            let want =
                0.5 * v as f64 * (1.0 + super::erf(v * std::f32::consts::FRAC_1_SQRT_2) as f64);
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "gelu({v}): {got} vs {want}"
            );
        }
        let (gain, bias): (Vec<f32>, Vec<f32>) = (0..203)
            .map(|i| (1.0 + i as f32 / 400.0, i as f32 / 1000.0))
            .unzip();
        let mut n = x.clone();
        super::norm_row(&mut n, &gain, &bias, 1e-12);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 203.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 203.0;
        for i in 0..203 {
            let want = (x[i] as f64 - mean) / var.sqrt() * gain[i] as f64 + bias[i] as f64;
            assert!(
                (n[i] as f64 - want).abs() < 1e-5,
                "norm[{i}]: {} vs {want}",
                n[i]
            );
        }
    }
}

//! The one-token decode step on host buffers, for CPU f32 models whose base projections are
//! quantized layers that flywheel-kernels covers (every GGUF model of the supported types).
//!
//! It runs the same arithmetic as the tensor path (`DecoderModel::forward` for one token, or
//! `decode_step`), bit for bit: the embedding row, RMSNorm as candle computes it, the fused
//! q/k/v and gate/up products, RoPE, attention over the host KV cache in place, SwiGLU, the
//! residuals and the output head. What a wrapper adds to its base (a LoRA update) comes from
//! [`Projection::add_host`], with the arithmetic of its `forward`. Every intermediate goes
//! into a [`DecodeScratch`] that keeps its buffers between steps, the kernels keep theirs per
//! thread, and the KV cache grows only when it is full, so in steady state (same batch size,
//! cache room reserved with [`Cache::reserve`]) a step allocates nothing on the heap.

use super::{Cache, DecoderModel};
use crate::layers::{with_cpu_f32, HostKv, HostLayer, RmsNorm};
use crate::linear::{Embedding, Linear, Projection};
use crate::qmatmul::kernel_type;
use crate::Result;
use flywheel_kernels::{BlockType, Path, Product, QMatrix};
use std::borrow::Cow;
use std::sync::Arc;

/// Working buffers of [`DecoderModel::decode_into`], reused from step to step (one per
/// generation loop). The logits of the last step stay here.
#[derive(Debug, Default, Clone)]
pub struct DecodeScratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
    logits: Vec<f32>,
    positions: Vec<usize>,
    vocab: usize,
}

impl DecodeScratch {
    /// The logits of the last step, `b × vocab` row-major (the sampler may change them).
    pub fn logits(&mut self) -> &mut [f32] {
        &mut self.logits
    }

    /// The vocabulary size of the last step's logits rows.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// A quantized layer as the kernels read it, with its bias.
struct HostLinear<'a> {
    w: QMatrix<'a>,
    bias: Option<&'a candle_core::Tensor>,
}

/// `l` as a kernel matrix: quantized, of a covered type, its blocks in host memory.
fn host_linear(l: &Linear) -> Option<HostLinear<'_>> {
    let w = l.kernel_matrix()?;
    if let Some(b) = &l.bias {
        with_cpu_f32(b, |_| ())?;
    }
    Some(HostLinear {
        w,
        bias: l.bias.as_ref(),
    })
}

/// `out_i = p_i(x)` for every listed projection, `m` one-token rows: the base layers' products
/// (one quantization of `x`), then whatever each wrapper adds ([`Projection::add_host`]).
fn project<const N: usize>(
    mut ps: [(&Arc<dyn Projection>, &mut Vec<f32>); N],
    x: &[f32],
    m: usize,
) -> Result<()> {
    // Base layers never change form, and `host_ready` checked them all.
    products(
        ps.each_mut().map(|(p, out)| {
            (
                host_linear(p.base()).expect("checked by host_ready"),
                &mut **out,
            )
        }),
        x,
        m,
    );
    for (p, out) in ps {
        if !p.add_host(x, m, out) {
            let e = "host decode: an adapter changed during the step";
            return Err(candle_core::Error::Msg(e.into()).into());
        }
    }
    Ok(())
}

/// `out_i = x_i · Wᵀ + b` for every listed layer (one quantization of `x`), `m` rows.
fn products<const N: usize>(mut layers: [(HostLinear<'_>, &mut Vec<f32>); N], x: &[f32], m: usize) {
    let mut ps = layers.each_mut().map(|(l, out)| {
        out.resize(m * l.w.n, 0.0);
        Product {
            w: l.w,
            out: &mut out[..],
        }
    });
    flywheel_kernels::matmul_many(&mut ps, x, m, Path::Auto);
    for (l, out) in layers.iter_mut() {
        if let Some(b) = l.bias {
            with_cpu_f32(b, |b| {
                for row in out.chunks_exact_mut(b.len()) {
                    for (y, &bv) in row.iter_mut().zip(b) {
                        *y += bv;
                    }
                }
            });
        }
    }
}

/// RMSNorm of each row of `x` into `out`, with candle's arithmetic (`candle_nn::ops::rms_norm`:
/// a sequential f32 sum of squares, `s / m · w`).
fn rms_norm(norm: &RmsNorm, x: &[f32], dim: usize, out: &mut Vec<f32>) -> Option<()> {
    out.resize(x.len(), 0.0);
    let eps = norm.eps as f32;
    with_cpu_f32(&norm.weight, |w| {
        for (src, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
            let m = (sum2 / dim as f32 + eps).sqrt();
            for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
                *d = s / m * a;
            }
        }
    })
}

/// Layer `l` of each cache, as the host buffers a one-token step writes.
struct LayerOf<'a, 'b> {
    caches: &'a mut [&'b mut Cache],
    l: usize,
}

impl HostLayer for LayerOf<'_, '_> {
    fn buffers(&self) -> usize {
        self.caches.len()
    }
    fn buffer(&mut self, c: usize) -> &mut HostKv {
        self.caches[c].layers[self.l]
            .host
            .as_mut()
            .expect("created before the step")
    }
}

impl DecoderModel {
    /// Every projection, the output head last.
    fn projections(&self) -> impl Iterator<Item = &Arc<dyn Projection>> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let a = &b.attn;
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &b.mlp.gate,
                    &b.mlp.up,
                    &b.mlp.down,
                ]
            })
            .chain(std::iter::once(&self.lm_head))
    }

    /// Whether every weight the host step reads qualifies (checked once per model; whether a
    /// wrapper adds something to its base is checked per step).
    fn host_ready(&self) -> bool {
        *self.host_ready.get_or_init(|| {
            let norms_ok = |n: &RmsNorm| with_cpu_f32(&n.weight, |_| ()).is_some();
            let embed_ok = match &self.embed {
                Embedding::Quantized(q) => {
                    kernel_type(q.dtype()).is_some() && matches!(q.data(), Ok(Cow::Borrowed(_)))
                }
                Embedding::Dense(w) => with_cpu_f32(w, |_| ()).is_some(),
            };
            self.device.is_cpu()
                && self.dtype == candle_core::DType::F32
                && embed_ok
                && norms_ok(&self.norm)
                && self
                    .blocks
                    .iter()
                    .all(|b| norms_ok(&b.attn_norm) && norms_ok(&b.mlp_norm))
                && self.projections().all(|p| host_linear(p.base()).is_some())
        })
    }

    /// One decode step on host buffers: `ids[i]` is the next token of row `i`, where the rows
    /// are either one per cache (`caches.len() == ids.len()`, single-row caches, as
    /// [`DecoderModel::decode_step`] takes them) or the rows of one cache. The logits land in
    /// `scratch` ([`DecodeScratch::logits`]). Returns `false`, having changed nothing, when the
    /// model or the caches do not qualify (GPU, half precision, dense projections, a wrapper
    /// that cannot add its update on host buffers ([`Projection::host_ready_now`]: a LoRA adapter
    /// being trained), training mode, padded rows, a cache held as tensors, the context full);
    /// the caller then takes the tensor path.
    pub fn decode_into(
        &self,
        ids: &[u32],
        caches: &mut [&mut Cache],
        scratch: &mut DecodeScratch,
    ) -> Result<bool> {
        let b = ids.len();
        let per_cache = match caches.len() {
            n if n == b && caches.iter().all(|c| c.pads.len() == 1) => true,
            1 if caches[0].pads.len() == b => false,
            _ => return Ok(false),
        };
        if b == 0
            || !self.host_ready()
            || self.training.load(std::sync::atomic::Ordering::Relaxed)
            || crate::linear::reference_kernels()
            || caches.iter().any(|c| c.pads.iter().any(|&p| p > 0))
            || !self.projections().all(|p| p.host_ready_now(b))
        {
            return Ok(false);
        }
        let cfg = &self.cfg;
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let rows_per_cache = if per_cache { 1 } else { b };
        let max_pos = self.rope.max_positions().min(cfg.max_position_embeddings);
        for c in caches.iter() {
            if c.len >= max_pos {
                return Ok(false);
            }
            for lc in &c.layers {
                let ok = match &lc.host {
                    Some(hk) => hk.fits(rows_per_cache, nkv, d) && hk.len == c.len,
                    None => c.len == 0,
                };
                if !ok || !lc.is_host_only() {
                    return Ok(false);
                }
            }
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(candle_core::Error::Msg(format!(
                "token id {id} is outside the vocabulary of {}",
                cfg.vocab_size
            ))
            .into());
        }
        for c in caches.iter_mut() {
            for lc in &mut c.layers {
                lc.host_mut(rows_per_cache, nkv, d)
                    .expect("checked: the cache holds no tensors and fits");
            }
        }
        let s = scratch;
        s.positions.clear();
        for i in 0..b {
            s.positions.push(caches[if per_cache { i } else { 0 }].len);
        }

        // Embedding rows.
        s.x.resize(b * h, 0.0);
        for (&id, x) in ids.iter().zip(s.x.chunks_exact_mut(h)) {
            let id = id as usize;
            match &self.embed {
                Embedding::Quantized(q) => {
                    let ty: BlockType = kernel_type(q.dtype()).expect("checked by host_ready");
                    let Ok(Cow::Borrowed(data)) = q.data() else {
                        unreachable!("checked by host_ready")
                    };
                    let rb = h / ty.block_elems() * ty.block_bytes();
                    flywheel_kernels::dequantize_into(ty, &data[id * rb..(id + 1) * rb], x);
                }
                Embedding::Dense(w) => {
                    with_cpu_f32(w, |w| x.copy_from_slice(&w[id * h..(id + 1) * h]));
                }
            }
        }

        let missing = || candle_core::Error::Msg("host decode: a weight changed form".into());
        for (l, block) in self.blocks.iter().enumerate() {
            let a = &block.attn;
            rms_norm(&block.attn_norm, &s.x, h, &mut s.xn).ok_or_else(missing)?;
            project(
                [
                    (&a.q_proj, &mut s.q),
                    (&a.k_proj, &mut s.k),
                    (&a.v_proj, &mut s.v),
                ],
                &s.xn,
                b,
            )?;
            s.attn.resize(b * nh * d, 0.0);
            a.attend_host(
                &self.rope,
                &s.positions,
                &mut s.q,
                &mut s.k,
                &s.v,
                &mut LayerOf {
                    caches: &mut *caches,
                    l,
                },
                &mut s.attn,
            )?;
            project([(&a.o_proj, &mut s.o)], &s.attn, b)?;
            for (x, &o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
            rms_norm(&block.mlp_norm, &s.x, h, &mut s.xn).ok_or_else(missing)?;
            project(
                [(&block.mlp.gate, &mut s.g), (&block.mlp.up, &mut s.u)],
                &s.xn,
                b,
            )?;
            s.act.resize(s.g.len(), 0.0);
            crate::autograd::ops::swiglu_into(&mut s.act, &s.g, &s.u, false);
            project([(&block.mlp.down, &mut s.o)], &s.act, b)?;
            for (x, &o) in s.x.iter_mut().zip(&s.o) {
                *x += o;
            }
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        rms_norm(&self.norm, &s.x, h, &mut s.xn).ok_or_else(missing)?;
        s.vocab = self.lm_head.base().out_dim();
        project([(&self.lm_head, &mut s.logits)], &s.xn, b)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::tiny;
    use super::*;
    use crate::decoder::{Architecture, DecoderConfig, Logits};
    use crate::linear::{LinearHook, NoHook};
    use crate::weights::MemoryWeights;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    /// Quantizes every projection (and a tied output head) to one block type.
    struct Quantize(GgmlDType);

    impl LinearHook for Quantize {
        fn wrap(&self, _name: &str, base: Linear) -> Result<Arc<dyn Projection>> {
            let w = QTensor::quantize(&base.dense_weight(DType::F32)?, self.0)?;
            Ok(Arc::new(Linear::quantized(Arc::new(w), base.bias.clone())?))
        }
    }

    /// Quantizes every projection to one block type and keeps it in the given layout.
    struct QuantizeIn(GgmlDType, flywheel_kernels::Layout);

    impl LinearHook for QuantizeIn {
        fn wrap(&self, _name: &str, base: Linear) -> Result<Arc<dyn Projection>> {
            let w = QTensor::quantize(&base.dense_weight(DType::F32)?, self.0)?;
            let l = Linear::quantized_in(Arc::new(w), base.bias.clone(), self.1)?;
            assert_eq!(l.layout(), self.1);
            Ok(Arc::new(l))
        }
    }

    /// The tiny config widened so that K-quants (blocks of 256) fit every projection.
    fn wide(arch: Architecture) -> DecoderConfig {
        DecoderConfig {
            hidden_size: 256,
            intermediate_size: 512,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            ..tiny(arch)
        }
    }

    fn model(cfg: &DecoderConfig, quant: Option<GgmlDType>) -> anyhow::Result<DecoderModel> {
        let w = MemoryWeights::random_decoder(cfg, 11, &Device::Cpu, DType::F32)?;
        Ok(match quant {
            Some(q) => DecoderModel::load(&w, cfg, &Quantize(q))?,
            None => DecoderModel::load(&w, cfg, &NoHook)?,
        })
    }

    fn prompt(rows: usize, len: usize) -> anyhow::Result<Tensor> {
        let ids: Vec<u32> = (0..rows * len).map(|i| (i * 37 % 90) as u32 + 3).collect();
        Ok(Tensor::from_vec(ids, (rows, len), &Device::Cpu)?)
    }

    #[test]
    fn host_steps_equal_the_tensor_path_bit_for_bit() -> anyhow::Result<()> {
        let cases = [
            (tiny(Architecture::Llama), GgmlDType::Q4_0),
            (tiny(Architecture::Llama), GgmlDType::Q4_1),
            (tiny(Architecture::Qwen2), GgmlDType::Q8_0),
            (wide(Architecture::Qwen2), GgmlDType::Q4K),
            (wide(Architecture::Llama), GgmlDType::Q6K),
        ];
        for (cfg, q) in cases {
            // A context past the KV buffers' first capacity (64 positions), so they grow.
            let cfg = DecoderConfig {
                max_position_embeddings: 100,
                ..cfg
            };
            let m = model(&cfg, Some(q))?;
            for rows in [1usize, 3] {
                let p = prompt(rows, 5)?;
                let mut a = m.new_cache(vec![0; rows]);
                let mut b = m.new_cache(vec![0; rows]);
                m.forward(&p, &mut a, Logits::Last)?;
                m.forward(&p, &mut b, Logits::Last)?;
                let mut s = DecodeScratch::default();
                for step in 0..cfg.max_position_embeddings - 5 {
                    let ids: Vec<u32> = (0..rows)
                        .map(|r| (step * 7 + r * 11) as u32 % 90 + 3)
                        .collect();
                    let t = Tensor::from_slice(&ids, (rows, 1), &Device::Cpu)?;
                    let want = m
                        .forward(&t, &mut a, Logits::Last)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    assert!(
                        m.decode_into(&ids, &mut [&mut b], &mut s)?,
                        "{q:?}: declined"
                    );
                    assert_eq!(s.vocab(), cfg.vocab_size);
                    assert_eq!(s.logits(), &want[..], "{q:?}, {rows} rows, step {step}");
                    assert_eq!(a.len(), b.len());
                }
                // The context is full: the host step declines, the tensor path gives the error.
                assert!(!m.decode_into(&[5; 3][..rows], &mut [&mut b], &mut s)?);
            }
        }
        Ok(())
    }

    #[test]
    fn repacked_models_equal_ggml_models_bit_for_bit() -> anyhow::Result<()> {
        // The same weights kept in ggml's layout and repacked into groups of four rows: the
        // short-prompt kernels, the prefill GEMM (20 positions), the host decode step, the
        // tensor decode path and candle's reference path (which unpacks) all give the same bits.
        use flywheel_kernels::Layout;
        for (arch, q) in [
            (Architecture::Llama, GgmlDType::Q4_0),
            (Architecture::Qwen2, GgmlDType::Q5_1),
            (Architecture::Llama, GgmlDType::Q8_0),
        ] {
            let cfg = tiny(arch);
            let w = MemoryWeights::random_decoder(&cfg, 11, &Device::Cpu, DType::F32)?;
            let g = DecoderModel::load(&w, &cfg, &QuantizeIn(q, Layout::Ggml))?;
            let r = DecoderModel::load(&w, &cfg, &QuantizeIn(q, Layout::Rows4))?;
            for (rows, len) in [(1usize, 5usize), (3, 4), (1, 20)] {
                let p = prompt(rows, len)?;
                let run = |m: &DecoderModel| -> anyhow::Result<Vec<Vec<f32>>> {
                    let mut out = vec![];
                    let mut c = m.new_cache(vec![0; rows]);
                    let mut h = m.new_cache(vec![0; rows]);
                    out.push(
                        m.forward(&p, &mut c, Logits::All)?
                            .flatten_all()?
                            .to_vec1()?,
                    );
                    m.forward(&p, &mut h, Logits::Last)?;
                    let mut s = DecodeScratch::default();
                    for step in 0..6u32 {
                        let ids: Vec<u32> = (0..rows as u32).map(|i| step * 5 + i + 3).collect();
                        let t = Tensor::from_slice(&ids, (rows, 1), &Device::Cpu)?;
                        out.push(
                            m.forward(&t, &mut c, Logits::Last)?
                                .flatten_all()?
                                .to_vec1()?,
                        );
                        assert!(m.decode_into(&ids, &mut [&mut h], &mut s)?);
                        out.push(s.logits().to_vec());
                    }
                    let mut c = m.new_cache(vec![0; rows]);
                    out.push(
                        crate::with_reference_kernels(|| m.forward(&p, &mut c, Logits::Last))?
                            .flatten_all()?
                            .to_vec1()?,
                    );
                    Ok(out)
                };
                let (a, b) = (run(&g)?, run(&r)?);
                assert!(a[0].iter().any(|v| *v != 0.0));
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x, y, "{q:?} {rows}x{len}: output {i}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn host_steps_over_separate_caches_equal_decode_step() -> anyhow::Result<()> {
        let cfg = tiny(Architecture::Qwen2);
        let m = model(&cfg, Some(GgmlDType::Q4_0))?;
        // Three sequences of different lengths, one single-row cache each.
        let (mut a, mut b) = (vec![], vec![]);
        for len in [2usize, 6, 9] {
            for set in [&mut a, &mut b] {
                let mut c = m.new_cache(vec![0]);
                m.forward(&prompt(1, len)?, &mut c, Logits::Last)?;
                set.push(c);
            }
        }
        let mut s = DecodeScratch::default();
        for step in 0..12u32 {
            let ids = [step + 3, step + 20, step + 40];
            let mut ra: Vec<&mut Cache> = a.iter_mut().collect();
            let want = m
                .decode_step(&ids, &mut ra)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut rb: Vec<&mut Cache> = b.iter_mut().collect();
            assert!(m.decode_into(&ids, &mut rb, &mut s)?);
            assert_eq!(s.logits(), &want[..], "step {step}");
        }
        Ok(())
    }

    #[test]
    fn the_host_step_declines_what_it_does_not_cover() -> anyhow::Result<()> {
        let cfg = tiny(Architecture::Llama);
        let mut s = DecodeScratch::default();
        // Dense projections.
        let dense = model(&cfg, None)?;
        let mut c = dense.new_cache(vec![0]);
        dense.forward(&prompt(1, 3)?, &mut c, Logits::Last)?;
        assert!(!dense.decode_into(&[4], &mut [&mut c], &mut s)?);
        let m = model(&cfg, Some(GgmlDType::Q8_0))?;
        // A left-padded batch (the tensor path masks the padding).
        let mut padded = m.new_cache(vec![0, 2]);
        m.forward(&prompt(2, 4)?, &mut padded, Logits::Last)?;
        assert!(!m.decode_into(&[4, 5], &mut [&mut padded], &mut s)?);
        // Rows that do not match the cache, training mode, the reference kernels.
        let mut c = m.new_cache(vec![0]);
        m.forward(&prompt(1, 3)?, &mut c, Logits::Last)?;
        assert!(!m.decode_into(&[4, 5], &mut [&mut c], &mut s)?);
        m.set_training(true);
        assert!(!m.decode_into(&[4], &mut [&mut c], &mut s)?);
        m.set_training(false);
        assert!(!crate::with_reference_kernels(|| m.decode_into(
            &[4],
            &mut [&mut c],
            &mut s
        ))?);
        // Nothing changed: the cache still takes the step.
        assert_eq!(c.len(), 3);
        assert!(m.decode_into(&[4], &mut [&mut c], &mut s)?);
        assert_eq!(c.len(), 4);
        // An id outside the vocabulary is an error, not a panic.
        assert!(m.decode_into(&[10_000], &mut [&mut c], &mut s).is_err());
        assert_eq!(c.len(), 4);
        Ok(())
    }
}

//! The decoder-only transformer of the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral) and Qwen2,
//! in one implementation: the differences are config (attention bias, RoPE theta/scaling,
//! tied embeddings), not code.
//!
//! Reference: Touvron et al., "Llama 2" (2023); the Hugging Face `modeling_llama.py` /
//! `modeling_qwen2.py` are the numeric references (half-split RoPE, RMSNorm, SwiGLU).

use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

use crate::layers::{Attention, LayerCache, Mlp, PositionTables, RmsNorm, Rope};
use crate::linear::{Embedding, LinearHook, Projection};
use crate::weights::Weights;
use crate::{Error, Result};

mod checkpoint;
mod config;
mod host_step;
use checkpoint::CheckpointOp;
pub use config::{json_token_ids, Architecture, DecoderConfig, RopeScaling};
pub use host_step::DecodeScratch;

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) attn_norm: RmsNorm,
    pub(crate) attn: Attention,
    pub(crate) mlp_norm: RmsNorm,
    pub(crate) mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &PositionTables,
        mask: Option<&Tensor>,
        lc: &mut LayerCache,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.attn_norm.forward(x)?, rope, positions, mask, lc)?;
        self.residual_mlp(x, a)
    }

    /// The rest of the block after attention: residual, then the MLP with its residual.
    fn residual_mlp(&self, x: &Tensor, attn: Tensor) -> Result<Tensor> {
        let x = (attn + x)?;
        Ok((self.mlp.forward(&self.mlp_norm.forward(&x)?)? + x)?)
    }

    /// [`Block::forward`] for one new token of each of several independent sequences.
    fn forward_decode(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &[usize],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward_decode(&self.attn_norm.forward(x)?, rope, positions, caches)?;
        self.residual_mlp(x, a)
    }
}

/// The KV cache of a (possibly left-padded) batch.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) pads: Vec<usize>,
    pub(crate) len: usize,
}

impl Cache {
    /// Tokens (padding included) the cache holds per row.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.pads.len()
    }

    /// Makes room in the host KV buffers for `extra` more positions, so that decoding them
    /// never grows the buffers (no reallocation, nothing copied). Layers whose keys and values
    /// are tensors (GPU, training) or not yet written are left as they are.
    pub fn reserve(&mut self, extra: usize) {
        for l in &mut self.layers {
            if let Some(h) = &mut l.host {
                h.reserve_exact(extra);
            }
        }
    }

    /// Keeps only the first `len` positions (a shared prompt prefix); longer caches are cut,
    /// shorter ones are an error.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(candle_core::Error::Msg(format!(
                "cannot cut a cache of {} positions to {len}",
                self.len
            ))
            .into());
        }
        for l in &mut self.layers {
            l.truncate(len)?;
        }
        self.len = len;
        Ok(())
    }
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `(b, vocab)` for the last position only (generation).
    Last,
    /// `(b, t, vocab)` for every position (training, scoring).
    All,
}

/// A decoder-only language model.
#[derive(Debug, Clone)]
pub struct DecoderModel {
    cfg: DecoderConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Arc<dyn Projection>,
    rope: Rope,
    dtype: DType,
    device: Device,
    checkpointing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    training: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether the host decode step ([`DecoderModel::decode_into`]) can run this model.
    host_ready: std::sync::OnceLock<bool>,
}

impl DecoderModel {
    /// Training mode: every layer computes with training numerics (dequantized f32 weights, the
    /// fused differentiable kernels), so a forward pass equals the one gradients are taken of.
    pub fn set_training(&self, on: bool) {
        self.training
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Recompute each block in the backward pass instead of keeping its activations (training on
    /// CPU in f32): far less memory for about one more forward pass of compute.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Builds the model from `w`; `hook` decides what wraps each projection.
    pub fn load(w: &dyn Weights, cfg: &DecoderConfig, hook: &dyn LinearHook) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed = w.embedding("model.embed_tokens", cfg.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let lin =
                |name: &str, out: usize, inp: usize, bias: bool| -> Result<Arc<dyn Projection>> {
                    let full = format!("{p}.{name}");
                    hook.wrap(&full, w.linear(&full, out, inp, bias)?)
                };
            let b = cfg.attention_bias;
            let attn = Attention::new(
                [
                    lin("self_attn.q_proj", cfg.num_heads * hd, h, b)?,
                    lin("self_attn.k_proj", cfg.num_kv_heads * hd, h, b)?,
                    lin("self_attn.v_proj", cfg.num_kv_heads * hd, h, b)?,
                    lin("self_attn.o_proj", h, cfg.num_heads * hd, false)?,
                ],
                cfg.num_heads,
                cfg.num_kv_heads,
                hd,
            );
            let mlp = Mlp::new(
                lin("mlp.gate_proj", cfg.intermediate_size, h, false)?,
                lin("mlp.up_proj", cfg.intermediate_size, h, false)?,
                lin("mlp.down_proj", h, cfg.intermediate_size, false)?,
            );
            blocks.push(Block {
                attn_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
                attn,
                mlp_norm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp,
            });
        }
        let norm = RmsNorm::load(w, "model.norm", h, cfg.rms_norm_eps)?;
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let lm_head = if tied {
            hook.wrap("lm_head", embed.as_linear()?)?
        } else {
            hook.wrap("lm_head", w.linear("lm_head", cfg.vocab_size, h, false)?)?
        };
        let llama3 = cfg.rope_scaling.map(|RopeScaling::Llama3(s)| s);
        let rope = Rope::new(
            hd,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            llama3,
            None,
            DType::F32,
            w.device(),
        )?;
        let mut cfg = cfg.clone();
        cfg.tie_word_embeddings = tied;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            dtype: w.dtype(),
            device: w.device().clone(),
            checkpointing: Default::default(),
            training: Default::default(),
            host_ready: Default::default(),
        })
    }

    /// Replaces the RoPE tables with ones whose inverse frequencies are divided by `divisors`
    /// (GGUF's `rope_freqs` tensor for Llama 3.x).
    pub fn set_rope_freq_divisors(&mut self, divisors: &[f32]) -> Result<()> {
        self.rope = Rope::new(
            self.cfg.head_dim,
            self.cfg.rope_theta,
            self.cfg.max_position_embeddings,
            None,
            Some(divisors),
            DType::F32,
            &self.device,
        )?;
        Ok(())
    }

    /// The resolved config.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty cache for `pads.len()` rows, row `i` left-padded with `pads[i]` tokens.
    pub fn new_cache(&self, pads: Vec<usize>) -> Cache {
        Cache {
            layers: vec![LayerCache::default(); self.blocks.len()],
            pads,
            len: 0,
        }
    }

    /// Feeds `ids` (`(b, t)` u32) after what `cache` holds; returns logits (f32).
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache, logits: Logits) -> Result<Tensor> {
        let x = self.hidden(ids, cache)?;
        let t = x.dim(1)?;
        let x = match logits {
            Logits::Last => x.narrow(1, t - 1, 1)?,
            Logits::All => x,
        };
        let out = self.head(&x)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    /// Feeds `ids` into `cache` without computing logits (all but the last chunk of a prompt).
    pub fn feed(&self, ids: &Tensor, cache: &mut Cache) -> Result<()> {
        self.hidden(ids, cache).map(|_| ())
    }

    /// One decode step for independent sequences (continuous batching): `ids[i]` is the next
    /// token of the sequence whose single-row cache is `caches[i]`. Returns `(b, vocab)` f32
    /// logits. Sequences may have different lengths; each attends only over its own cache.
    pub fn decode_step(&self, ids: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        let b = ids.len();
        if caches.len() != b || caches.iter().any(|c| c.pads.len() != 1) {
            return Err(candle_core::Error::Msg(format!(
                "decode step: {b} tokens for {} caches (each must hold one row)",
                caches.len()
            ))
            .into());
        }
        let ctx = self.cfg.max_position_embeddings;
        let mut positions = Vec::with_capacity(b);
        for c in caches.iter() {
            if c.len + 1 > ctx {
                return Err(Error::Config {
                    file: "(request)".into(),
                    field: "max_position_embeddings".into(),
                    reason: format!("{} tokens exceed the model's context of {ctx}", c.len + 1),
                });
            }
            positions.push(c.len - c.pads[0]);
        }
        let input = Tensor::from_slice(ids, (b, 1), &self.device)?;
        let mut x = self.embed.forward(&input, self.dtype)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let mut lcs: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = block.forward_decode(&x, &self.rope, &positions, &mut lcs)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(self.head(&x)?.squeeze(1)?)
    }

    /// Logits `(n, vocab)` f32 for the positions `rows` of the flattened `(b·t)` batch only
    /// (training: the output head runs on the answer tokens, not on the whole prompt).
    pub fn forward_rows(&self, ids: &Tensor, cache: &mut Cache, rows: &[u32]) -> Result<Tensor> {
        let x = self.hidden(ids, cache)?;
        let (b, t, h) = x.dims3()?;
        let idx = Tensor::from_slice(rows, rows.len(), &self.device)?;
        let picked = x.reshape((b * t, h))?.index_select(&idx, 0)?;
        self.head(&picked)
    }

    /// Final norm and output head, in f32.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward(&self.norm.forward(x)?)?
            .to_dtype(DType::F32)?)
    }

    /// The last hidden state `(b, t, hidden)` before the final norm.
    fn hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != cache.pads.len() {
            return Err(candle_core::Error::Msg(format!(
                "batch of {b} rows fed to a cache of {} rows",
                cache.pads.len()
            ))
            .into());
        }
        let start = cache.len;
        if start + t > self.cfg.max_position_embeddings {
            return Err(Error::Config {
                file: "(request)".into(),
                field: "max_position_embeddings".into(),
                reason: format!(
                    "{} tokens exceed the model's context of {}",
                    start + t,
                    self.cfg.max_position_embeddings
                ),
            });
        }
        let padded = cache.pads.iter().any(|&p| p > 0);
        let positions = if padded {
            let mut pos = Vec::with_capacity(b * t);
            for &pad in &cache.pads {
                for s in 0..t {
                    pos.push((start + s).saturating_sub(pad) as u32);
                }
            }
            PositionTables::PerRow(Tensor::from_vec(pos, (b, t), &self.device)?)
        } else {
            PositionTables::Shared(start, t)
        };
        let mask = if padded || t > 1 {
            Some(self.mask(&cache.pads, start, t)?)
        } else {
            None
        };
        let mut x = self.embed.forward(ids, self.dtype)?;
        let training = self.training.load(std::sync::atomic::Ordering::Relaxed)
            && crate::autograd::ops::grad_enabled();
        let checkpoint = training
            && self
                .checkpointing
                .load(std::sync::atomic::Ordering::Relaxed)
            && crate::autograd::ops::applicable(&x);
        if training {
            // Every layer then computes with training numerics (the first block's projections
            // included), and checkpointed blocks get inputs that carry gradients.
            x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
        }
        for (block, lc) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = if checkpoint {
                x.contiguous()?.apply_op1(CheckpointOp {
                    block: block.clone(),
                    rope: self.rope.clone(),
                    positions: positions.clone(),
                    mask: mask.clone(),
                })?
            } else {
                block.forward(&x, &self.rope, &positions, mask.as_ref(), lc)?
            };
        }
        cache.len += t;
        Ok(x)
    }

    /// Additive mask `(b, 1, t, start + t)`: causal, and no attention to a row's left padding
    /// (a padding query still sees itself, so its softmax stays finite).
    fn mask(&self, pads: &[usize], start: usize, t: usize) -> Result<Tensor> {
        let seq = start + t;
        let mut m = vec![0f32; pads.len() * t * seq];
        for (i, &pad) in pads.iter().enumerate() {
            for s in 0..t {
                let q = start + s;
                for j in 0..seq {
                    let allowed = j <= q && (j >= pad || j == q);
                    if !allowed {
                        m[(i * t + s) * seq + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (pads.len(), 1, t, seq), &self.device)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_is_not_json_says_so() {
        let err = DecoderConfig::from_hf_json("{\"model_type\": ", "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config.json: not valid JSON") && !err.contains("(json)"),
            "{err}"
        );
    }
    use crate::linear::NoHook;
    use crate::weights::MemoryWeights;

    /// A tiny config of each family: a few layers, GQA, small widths.
    pub(crate) fn tiny(arch: Architecture) -> DecoderConfig {
        DecoderConfig {
            arch,
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            attention_bias: arch == Architecture::Qwen2,
            tie_word_embeddings: arch == Architecture::Llama,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    fn model(arch: Architecture) -> anyhow::Result<DecoderModel> {
        let cfg = tiny(arch);
        let w = MemoryWeights::random_decoder(&cfg, 7, &crate::test_device(), DType::F32)?;
        Ok(DecoderModel::load(&w, &cfg, &NoHook)?)
    }

    fn ids(v: &[u32]) -> anyhow::Result<Tensor> {
        Ok(Tensor::new(v, &crate::test_device())?.unsqueeze(0)?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn full_forward_equals_prefill_plus_cached_decode() -> anyhow::Result<()> {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let m = model(arch)?;
            let seq = [5u32, 17, 3, 88, 41, 9, 60];
            let mut c = m.new_cache(vec![0]);
            let full = m.forward(&ids(&seq)?, &mut c, Logits::All)?.squeeze(0)?; // (t, vocab)
            let mut c = m.new_cache(vec![0]);
            let first = m
                .forward(&ids(&seq[..4])?, &mut c, Logits::Last)?
                .squeeze(0)?;
            assert!(max_diff(&first, &full.get(3)?)? < 1e-4, "{arch:?} prefill");
            for (k, &tok) in seq.iter().enumerate().skip(4) {
                let step = m.forward(&ids(&[tok])?, &mut c, Logits::Last)?.squeeze(0)?;
                let d = max_diff(&step, &full.get(k)?)?;
                assert!(d < 1e-4, "{arch:?} position {k}: max diff {d}");
            }
            assert_eq!(c.len(), seq.len());
        }
        Ok(())
    }

    /// The host prefill (fused causal attention over the cache) against candle's reference
    /// path: a prompt on an empty cache, a second chunk continuing it, and two unpadded rows.
    #[test]
    fn host_prefill_matches_the_reference_path() -> anyhow::Result<()> {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let m = model(arch)?;
            // 21 + 13 tokens: the host path's query blocks (8 in unit tests) end mid-prompt.
            let prompt: Vec<u32> = (0..21).map(|i| (i * 37 + 5) % 96).collect();
            let more: Vec<u32> = (0..13).map(|i| (i * 11 + 9) % 96).collect();
            let run = |reference: bool| -> anyhow::Result<(Tensor, Tensor, Tensor)> {
                let go = || -> anyhow::Result<(Tensor, Tensor, Tensor)> {
                    let mut c = m.new_cache(vec![0]);
                    let first = m.forward(&ids(&prompt)?, &mut c, Logits::All)?;
                    let next = m.forward(&ids(&more)?, &mut c, Logits::All)?;
                    let rows = Tensor::new(&[[5u32, 17, 3, 88], [7, 11, 13, 1]], m.device())?;
                    let mut c2 = m.new_cache(vec![0, 0]);
                    let both = m.forward(&rows, &mut c2, Logits::All)?;
                    Ok((first, next, both))
                };
                if reference {
                    crate::with_reference_kernels(go)
                } else {
                    go()
                }
            };
            let (a, b) = (run(false)?, run(true)?);
            for (name, x, y) in [
                ("first", &a.0, &b.0),
                ("next", &a.1, &b.1),
                ("rows", &a.2, &b.2),
            ] {
                let d = max_diff(x, y)?;
                assert!(d < 1e-4, "{arch:?} {name}: max diff {d}");
            }
            // The test can fail: a different continuation changes the logits.
            let mut c = m.new_cache(vec![0]);
            let mut changed = prompt.clone();
            changed[3] = (changed[3] + 1) % 96;
            m.forward(&ids(&changed)?, &mut c, Logits::All)?;
            let other = m.forward(&ids(&more)?, &mut c, Logits::All)?;
            assert!(max_diff(&other, &a.1)? > 1e-4, "{arch:?} cache ignored");
        }
        Ok(())
    }

    #[test]
    fn decode_step_rows_match_full_forwards_and_caches_clone_and_truncate() -> anyhow::Result<()> {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let m = model(arch)?;
            let (a, b) = ([5u32, 17, 3], [88u32, 41, 9, 60, 2]);
            let mut ca = m.new_cache(vec![0]);
            m.feed(&ids(&a)?, &mut ca)?;
            let mut cb = m.new_cache(vec![0]);
            m.feed(&ids(&b)?, &mut cb)?;
            let snap = cb.clone();
            // Two sequences of different lengths in one step; each row attends to its own cache.
            let both = m.decode_step(&[7, 11], &mut [&mut ca, &mut cb])?;
            for (row, (prefix, tok)) in [(&a[..], 7u32), (&b[..], 11)].into_iter().enumerate() {
                let mut seq = prefix.to_vec();
                seq.push(tok);
                let mut c = m.new_cache(vec![0]);
                let full = m.forward(&ids(&seq)?, &mut c, Logits::Last)?.squeeze(0)?;
                let d = max_diff(&both.get(row)?, &full)?;
                assert!(d < 1e-4, "{arch:?} row {row}: max diff {d}");
            }
            // The clone taken before the step is unaffected by it.
            let mut snap2 = snap.clone();
            let again = m
                .forward(&ids(&[11])?, &mut snap2, Logits::Last)?
                .squeeze(0)?;
            assert!(max_diff(&again, &both.get(1)?)? < 1e-5, "{arch:?} clone");
            // Cutting the stepped cache back to the prompt gives the same step again.
            cb.truncate(b.len())?;
            let cut = m.forward(&ids(&[11])?, &mut cb, Logits::Last)?.squeeze(0)?;
            assert!(max_diff(&cut, &again)? < 1e-6, "{arch:?} truncate");
            // A different token after the cut really recomputes (the test can fail).
            cb.truncate(b.len())?;
            let other = m.forward(&ids(&[12])?, &mut cb, Logits::Last)?.squeeze(0)?;
            assert!(max_diff(&other, &again)? > 1e-6, "{arch:?} token ignored");
        }
        Ok(())
    }

    #[test]
    fn padded_batch_equals_each_prompt_alone() -> anyhow::Result<()> {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let m = model(arch)?;
            let prompts: [&[u32]; 3] = [&[4, 8, 15], &[16, 23, 42, 7, 1, 50], &[9, 9, 30, 31, 2]];
            let longest = 6;
            let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
            let mut flat = vec![];
            for p in prompts {
                flat.extend(std::iter::repeat_n(0u32, longest - p.len()));
                flat.extend_from_slice(p);
            }
            let mut bc = m.new_cache(pads);
            let batch = m.forward(
                &Tensor::from_vec(flat, (3, longest), m.device())?,
                &mut bc,
                Logits::Last,
            )?;
            let next = [11u32, 12, 13];
            let batch2 = m.forward(
                &Tensor::from_vec(next.to_vec(), (3, 1), m.device())?,
                &mut bc,
                Logits::Last,
            )?;
            for (i, p) in prompts.iter().enumerate() {
                let mut c = m.new_cache(vec![0]);
                let alone = m.forward(&ids(p)?, &mut c, Logits::Last)?.squeeze(0)?;
                let d = max_diff(&alone, &batch.get(i)?)?;
                assert!(d < 1e-4, "{arch:?} row {i} prefill: max diff {d}");
                let alone2 = m
                    .forward(&ids(&[next[i]])?, &mut c, Logits::Last)?
                    .squeeze(0)?;
                let d = max_diff(&alone2, &batch2.get(i)?)?;
                assert!(d < 1e-4, "{arch:?} row {i} decode: max diff {d}");
            }
        }
        Ok(())
    }

    /// bf16 weights and activations agree with f32 within bf16's precision, in prefill and in a
    /// cached decode step.
    #[test]
    fn bf16_agrees_with_f32() -> anyhow::Result<()> {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let cfg = tiny(arch);
            let run = |dtype: DType| -> anyhow::Result<Tensor> {
                let w = MemoryWeights::random_decoder(&cfg, 7, &crate::test_device(), dtype)?;
                let m = DecoderModel::load(&w, &cfg, &NoHook)?;
                let mut c = m.new_cache(vec![0]);
                let prefill = m.forward(&ids(&[5, 17, 3, 88, 41, 9, 60])?, &mut c, Logits::All)?;
                let step = m.forward(&ids(&[7])?, &mut c, Logits::All)?;
                Ok(Tensor::cat(&[prefill.squeeze(0)?, step.squeeze(0)?], 0)?
                    .to_dtype(DType::F32)?)
            };
            let (f32s, bf16s) = (run(DType::F32)?, run(DType::BF16)?);
            let norm = |t: &Tensor| -> anyhow::Result<f32> {
                Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
            };
            let rel = norm(&(&bf16s - &f32s)?)? / norm(&f32s)?;
            // Zero would mean the bf16 run never left f32.
            assert!(rel > 0.0 && rel < 5e-2, "{arch:?}: relative error {rel}");
        }
        Ok(())
    }

    #[test]
    fn random_weights_are_seeded() -> anyhow::Result<()> {
        let cfg = tiny(Architecture::Llama);
        let a = MemoryWeights::random_decoder(&cfg, 1, &Device::Cpu, DType::F32)?;
        let b = MemoryWeights::random_decoder(&cfg, 1, &Device::Cpu, DType::F32)?;
        let c = MemoryWeights::random_decoder(&cfg, 2, &Device::Cpu, DType::F32)?;
        let n = "model.layers.1.mlp.up_proj.weight";
        assert_eq!(max_diff(&a.tensors[n], &b.tensors[n])?, 0.0);
        assert!(max_diff(&a.tensors[n], &c.tensors[n])? > 0.0);
        Ok(())
    }

    #[test]
    fn context_overflow_is_a_clear_error() -> anyhow::Result<()> {
        let m = model(Architecture::Llama)?;
        let mut c = m.new_cache(vec![0]);
        let long: Vec<u32> = (0..65).map(|i| i % 90).collect();
        let err = m
            .forward(&ids(&long)?, &mut c, Logits::Last)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("65 tokens exceed the model's context of 64"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn hf_config_parses_and_names_bad_fields() {
        let ok = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
            "rope_theta":100000,"max_position_embeddings":8192,"tie_word_embeddings":true,
            "bos_token_id":1,"eos_token_id":[2, 0],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = DecoderConfig::from_hf_json(ok, "config.json").unwrap();
        assert_eq!(
            (c.head_dim, c.num_kv_heads, c.eos_token_ids.clone()),
            (64, 3, vec![2, 0])
        );
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3(s)) if s.factor == 8.0));
        assert_eq!(c.parameter_count(), 134_515_008); // SmolLM2-135M
        let e =
            DecoderConfig::from_hf_json(&ok.replace("\"llama\"", "\"gpt_neox\""), "x/config.json")
                .unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported architecture `gpt_neox`")
                && e.to_string().contains("x/config.json"),
            "{e}"
        );
        let e = DecoderConfig::from_hf_json(
            &ok.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":2"),
            "c.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = DecoderConfig::from_hf_json(&ok.replace("\"hidden_size\":576,", ""), "c.json")
            .unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    /// transformers 5 moves `rope_theta` and the scaling into `rope_parameters`.
    #[test]
    fn hf_config_reads_transformers_5_rope_parameters() {
        let base = r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"rms_norm_eps":1e-6,
            "max_position_embeddings":32768,"tie_word_embeddings":true,ROPE}"#;
        let parse = |rope: &str| DecoderConfig::from_hf_json(&base.replace("ROPE", rope), "c.json");
        let c =
            parse(r#""rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}"#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (1e6, true));
        let c = parse(
            r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":32.0,
                "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3(s)) if s.factor == 32.0));
        // The top-level key, as transformers 4 writes it, still wins.
        let c = parse(r#""rope_theta":10000.0,"rope_parameters":{"rope_theta":1.0}"#).unwrap();
        assert_eq!(c.rope_theta, 1e4);
        let e = parse(r#""rope_parameters":{"rope_type":"yarn","factor":4.0}"#).unwrap_err();
        assert!(e.to_string().contains("rope_parameters.rope_type"), "{e}");
    }
}

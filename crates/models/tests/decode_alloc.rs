//! The host decode step allocates nothing on the heap in steady state: a counting global
//! allocator watches every thread while a quantized model decodes (one row and a batch of
//! three), after the cache room is reserved and a warm-up step has sized the buffers.
//! (Its own test binary, so no other test allocates meanwhile.)

use candle_core::quantized::QTensor;
use flywheel_models::{
    Architecture, DType, DecodeScratch, DecoderConfig, DecoderModel, Device, GgmlDType, Linear,
    LinearHook, Logits, MemoryWeights, Projection, Tensor,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Quantizes every projection to Q4_0 (Q8_0 for the tied output head).
struct Quantize;

impl LinearHook for Quantize {
    fn wrap(&self, name: &str, base: Linear) -> flywheel_models::Result<Arc<dyn Projection>> {
        let ty = if name == "lm_head" {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_0
        };
        let w = QTensor::quantize(&base.dense_weight(DType::F32)?, ty)?;
        Ok(Arc::new(Linear::quantized(Arc::new(w), None)?))
    }
}

fn config() -> DecoderConfig {
    DecoderConfig {
        arch: Architecture::Llama,
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 320,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        attention_bias: false,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Allocations made by `steps` host decode steps of `rows` rows after warming up.
fn allocations_while_decoding(m: &DecoderModel, rows: usize, steps: usize) -> usize {
    let ids: Vec<u32> = (0..rows * 8).map(|i| (i * 13 % 500) as u32 + 3).collect();
    let prompt = Tensor::from_vec(ids, (rows, 8), &Device::Cpu).unwrap();
    let mut cache = m.new_cache(vec![0; rows]);
    m.forward(&prompt, &mut cache, Logits::Last).unwrap();
    cache.reserve(steps + 1);
    let mut s = DecodeScratch::default();
    let next: Vec<u32> = (0..rows as u32).map(|r| r + 7).collect();
    // Everything runs on one pool thread, as the generation loop does (`on_pool`).
    flywheel_models::on_pool(&Device::Cpu, || {
        assert!(m.decode_into(&next, &mut [&mut cache], &mut s).unwrap());
        ALLOCATIONS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for i in 0..steps {
            let tok = [(i % 500) as u32 + 3; 3];
            assert!(m
                .decode_into(&tok[..rows], &mut [&mut cache], &mut s)
                .unwrap());
        }
        COUNTING.store(false, Ordering::SeqCst);
    });
    ALLOCATIONS.load(Ordering::SeqCst)
}

#[test]
fn a_host_decode_step_allocates_nothing_in_steady_state() {
    let cfg = config();
    let w = MemoryWeights::random_decoder(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let m = DecoderModel::load(&w, &cfg, &Quantize).unwrap();
    for rows in [1, 3] {
        let n = allocations_while_decoding(&m, rows, 40);
        assert_eq!(n, 0, "{rows} row(s): {n} allocations in 40 decode steps");
    }
    // The counter works: the tensor path allocates on every step.
    let mut cache = m.new_cache(vec![0]);
    let t = Tensor::new(&[[5u32]], &Device::Cpu).unwrap();
    m.forward(&t, &mut cache, Logits::Last).unwrap();
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    m.forward(&t, &mut cache, Logits::Last).unwrap();
    COUNTING.store(false, Ordering::SeqCst);
    assert!(ALLOCATIONS.load(Ordering::SeqCst) > 0);
}

//! Where a model's tensors come from. Architectures ask for tensors by their Hugging Face names
//! (`model.layers.0.self_attn.q_proj`); each source maps those names onto its own files:
//! safetensors (one file or shards) or a GGUF file (llama.cpp names, weights kept quantized).

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::linear::{Embedding, Linear};
use crate::{Error, Result};

/// A source of named tensors for building a model.
pub trait Weights {
    /// The file(s) behind this source, for error messages.
    fn describe(&self) -> String;
    /// The device tensors are loaded onto.
    fn device(&self) -> &Device;
    /// The dtype dense tensors are converted to.
    fn dtype(&self) -> DType;
    /// Whether a tensor of this (Hugging Face) name exists.
    fn contains(&self, name: &str) -> bool;
    /// A dense tensor of the given shape in the compute dtype.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The linear layer `name` (`name.weight` of shape `(out, in)`, optional `name.bias`).
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear>;
    /// The embedding table `name.weight` of shape `(vocab, hidden)`.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding>;
}

fn check_shape(name: &str, file: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            file: file.to_string(),
            got: got.to_vec(),
            want: want.to_vec(),
        });
    }
    Ok(())
}

/// Tensors from one or more safetensors files (memory-mapped).
pub struct SafetensorsWeights {
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    device: Device,
    dtype: DType,
}

impl SafetensorsWeights {
    /// Opens the files (a single `model.safetensors` or all shards of an index).
    pub fn open(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        for f in files {
            // Validate each file on its own first, so a bad shard is named in the error.
            // SAFETY: the file is mapped read-only; flywheel never writes to model files it reads.
            #[allow(unsafe_code)]
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::BadFile {
                file: f.display().to_string(),
                reason: format!("not a readable safetensors file ({e})"),
            })?;
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::BadFile {
            file: describe_files(files),
            reason: e.to_string(),
        })?;
        Ok(Self {
            files: files.to_vec(),
            st,
            device: device.clone(),
            dtype,
        })
    }

    /// Every tensor name with its dtype (for `flywheel info`).
    pub fn dtypes(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, view) in self.st.tensors() {
            *out.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
        }
        out
    }

    /// Total number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.st
            .tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum()
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        if self.st.get(name).is_err() {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                file: self.describe(),
            });
        }
        self.st
            .load(name, &self.device)
            .map_err(|e| Error::BadFile {
                file: self.describe(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }
}

fn describe_files(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        many => format!(
            "{} ({} shards)",
            many[0].parent().unwrap_or(Path::new(".")).display(),
            many.len()
        ),
    }
}

impl Weights for SafetensorsWeights {
    fn describe(&self) -> String {
        describe_files(&self.files)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        check_shape(name, &self.describe(), t.dims(), shape)?;
        Ok(t.to_dtype(self.dtype)?)
    }
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let w = self.tensor(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let b = if bias {
            Some(self.tensor(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Linear::dense(w, b)
    }
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::Dense(
            self.tensor(&format!("{name}.weight"), &[vocab, hidden])?,
        ))
    }
}

/// Tensors from a GGUF file. Matrices stay in their quantized block format.
pub struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<File>,
    device: Device,
    dtype: DType,
    /// `(n_head, n_kv_head)` when Q/K rows were permuted by llama.cpp's converter (llama arch).
    unpermute_qk: Option<(usize, usize)>,
}

/// Maps a Hugging Face tensor name onto llama.cpp's GGUF name.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Every tensor's data must lie inside the file, at an aligned offset, without overlapping
/// another's: a file that breaks this would load and compute garbage.
fn check_tensor_layout(
    content: &gguf_file::Content,
    file_len: u64,
) -> std::result::Result<(), String> {
    let align = match content.metadata.get("general.alignment") {
        Some(v) => v.to_u32().map(u64::from).unwrap_or(32),
        None => 32,
    };
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(content.tensor_infos.len());
    for (name, t) in &content.tensor_infos {
        let shown = printable(name);
        let elems = t.shape.elem_count() as u64;
        let block = t.ggml_dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(format!(
                "tensor `{shown}`: {elems} elements are not whole {block}-element blocks of {:?}",
                t.ggml_dtype
            ));
        }
        let size = elems / block * t.ggml_dtype.type_size() as u64;
        let start = content.tensor_data_offset.saturating_add(t.offset);
        if align > 0 && !t.offset.is_multiple_of(align) {
            return Err(format!(
                "tensor `{shown}`: offset {} is not {align}-byte aligned",
                t.offset
            ));
        }
        if start.saturating_add(size) > file_len {
            return Err(format!(
                "tensor `{shown}`: its data ({size} bytes at {start}) runs past the end of the file ({file_len} bytes)"
            ));
        }
        spans.push((start, start + size, name));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "tensors `{}` and `{}` overlap in the file",
                printable(w[0].2),
                printable(w[1].2)
            ));
        }
    }
    Ok(())
}

/// A tensor name from a file, safe to print (control characters escaped, length bounded; the
/// models crate sits below `flywheel_api`, whose `text::escape` does this elsewhere).
fn printable(name: &str) -> String {
    name.chars()
        .take(120)
        .map(|c| {
            if c.is_control() {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl GgufWeights {
    /// Opens a GGUF file and reads its header (metadata and tensor index, not the data).
    pub fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let bad = |reason: String| Error::BadFile {
            file: path.display().to_string(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| bad(format!("cannot read: {e}")))?
            .len();
        check_tensor_layout(&content, len).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            device: device.clone(),
            dtype,
            unpermute_qk: None,
        })
    }

    /// The file's metadata.
    pub fn metadata(&self) -> &std::collections::HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// The parsed header.
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Undo llama.cpp's Q/K row permutation (its converter interleaves the rotary halves for the
    /// `llama` architecture), so weights match the Hugging Face layout that adapters are trained on.
    pub fn set_unpermute_qk(&mut self, n_head: usize, n_kv_head: usize) {
        self.unpermute_qk = Some((n_head, n_kv_head));
    }

    /// Count of tensors per block type (for `flywheel info`).
    pub fn quant_types(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *out.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
        out
    }

    /// Total number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.content
            .tensor_infos
            .values()
            .map(|i| i.shape.elem_count())
            .sum()
    }

    fn gguf_name(&self, name: &str) -> Result<String> {
        hf_to_gguf_name(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.describe(),
        })
    }

    /// The index entry of `hf_name`, with its shape checked against `shape`.
    fn info(&self, hf_name: &str, shape: &[usize]) -> Result<(String, &gguf_file::TensorInfo)> {
        let name = self.gguf_name(hf_name)?;
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: self.describe(),
            })?;
        check_shape(&name, &self.describe(), info.shape.dims(), shape)?;
        Ok((name, info))
    }

    fn qtensor(&self, hf_name: &str, shape: &[usize]) -> Result<QTensor> {
        let (name, info) = self.info(hf_name, shape)?;
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let q = read_tensor(&mut file, info, self.content.tensor_data_offset).map_err(|e| {
            Error::BadFile {
                file: self.describe(),
                reason: format!("tensor `{name}`: {e}"),
            }
        })?;
        drop(file);
        let q = match self.qk_heads(hf_name) {
            Some(heads) => permute_rows(&q, heads)?,
            None => q,
        };
        if self.device.is_cpu() {
            Ok(q)
        } else {
            let data = q.data()?;
            let storage = QStorage::from_data(Cow::Borrowed(&data), &self.device, q.dtype())?;
            Ok(QTensor::new(storage, q.shape().clone())?)
        }
    }

    /// The `(rows, cols)` weight `hf_name` read straight into the layout the decode kernels
    /// prefer on this CPU ([`crate::packed::preferred_layout_for`]), repacked in place: `None`
    /// when that is ggml's own layout.
    fn repacked(&self, hf_name: &str, rows: usize, cols: usize) -> Result<Option<QTensor>> {
        let (name, info) = self.info(hf_name, &[rows, cols])?;
        let layout = crate::packed::preferred_layout_for(info.ggml_dtype, &self.device, rows);
        if layout != flywheel_kernels::Layout::Rows4 {
            return Ok(None);
        }
        let bad = |e: candle_core::Error| Error::BadFile {
            file: self.describe(),
            reason: format!("tensor `{name}`: {e}"),
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = read_bytes(&mut file, info, self.content.tensor_data_offset).map_err(bad)?;
        drop(file);
        let bytes = match self.qk_heads(hf_name) {
            Some(heads) => permute_row_bytes(&bytes, rows, heads),
            None => bytes,
        };
        let q = crate::packed::from_ggml_bytes(info.ggml_dtype, bytes, rows, cols).map_err(bad)?;
        Ok(Some(q))
    }

    fn qk_heads(&self, hf_name: &str) -> Option<usize> {
        let (n_head, n_kv) = self.unpermute_qk?;
        if hf_name.contains("self_attn.q_proj.") {
            Some(n_head)
        } else if hf_name.contains("self_attn.k_proj.") {
            Some(n_kv)
        } else {
            None
        }
    }
}

/// Reads one tensor's blocks straight into their typed storage: one allocation the size of the
/// tensor (candle's reader fills a byte buffer and then copies it, so loading the largest tensor,
/// e.g. a 145 MB token embedding, briefly needs twice its size).
fn read_tensor(
    file: &mut File,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
) -> candle_core::Result<QTensor> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::QuantizedType;
    use std::io::Read;

    fn typed<B: GgmlType + Send + Sync + 'static>(
        file: &mut File,
        blocks: usize,
        block_bytes: usize,
    ) -> candle_core::Result<Box<dyn QuantizedType>>
    where
        Vec<B>: QuantizedType,
    {
        if std::mem::size_of::<B>() != block_bytes {
            candle_core::bail!(
                "block size mismatch ({} vs {block_bytes})",
                std::mem::size_of::<B>()
            );
        }
        let mut v: Vec<B> = vec![B::zeros(); blocks];
        // SAFETY: `B` is a `repr(C)` block of plain integers and f16s (any bit pattern is a
        // value) whose size was just checked, so its initialised storage may be filled as bytes.
        #[allow(unsafe_code)]
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, blocks * block_bytes)
        };
        file.read_exact(bytes)?;
        Ok(Box::new(v))
    }

    let ty = info.ggml_dtype;
    let blocks = seek_tensor(file, info, data_offset)? / ty.type_size();
    let bb = ty.type_size();
    let storage = match ty {
        GgmlDType::F32 => typed::<f32>(file, blocks, bb)?,
        GgmlDType::F16 => typed::<half::f16>(file, blocks, bb)?,
        GgmlDType::BF16 => typed::<half::bf16>(file, blocks, bb)?,
        GgmlDType::Q4_0 => typed::<BlockQ4_0>(file, blocks, bb)?,
        GgmlDType::Q4_1 => typed::<BlockQ4_1>(file, blocks, bb)?,
        GgmlDType::Q5_0 => typed::<BlockQ5_0>(file, blocks, bb)?,
        GgmlDType::Q5_1 => typed::<BlockQ5_1>(file, blocks, bb)?,
        GgmlDType::Q8_0 => typed::<BlockQ8_0>(file, blocks, bb)?,
        GgmlDType::Q8_1 => typed::<BlockQ8_1>(file, blocks, bb)?,
        GgmlDType::Q2K => typed::<BlockQ2K>(file, blocks, bb)?,
        GgmlDType::Q3K => typed::<BlockQ3K>(file, blocks, bb)?,
        GgmlDType::Q4K => typed::<BlockQ4K>(file, blocks, bb)?,
        GgmlDType::Q5K => typed::<BlockQ5K>(file, blocks, bb)?,
        GgmlDType::Q6K => typed::<BlockQ6K>(file, blocks, bb)?,
        GgmlDType::Q8K => typed::<BlockQ8K>(file, blocks, bb)?,
    };
    QTensor::new(QStorage::Cpu(storage), info.shape.dims().to_vec())
}

/// Checks that tensor `info`'s blocks lie inside the file and seeks to them; returns their size
/// in bytes.
fn seek_tensor(
    file: &mut File,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
) -> candle_core::Result<usize> {
    use std::io::{Seek, SeekFrom};
    let ty = info.ggml_dtype;
    let elems = info.shape.elem_count();
    if !elems.is_multiple_of(ty.block_size()) {
        candle_core::bail!("{elems} elements are not whole blocks of {ty:?}");
    }
    let size = elems / ty.block_size() * ty.type_size();
    let start = data_offset.saturating_add(info.offset);
    let file_size = file.seek(SeekFrom::End(0))?;
    if start.saturating_add(size as u64) > file_size {
        candle_core::bail!(
            "needs {size} bytes at offset {start}, only {} remaining in file",
            file_size.saturating_sub(start)
        );
    }
    file.seek(SeekFrom::Start(start))?;
    Ok(size)
}

/// Reads tensor `info`'s blocks as raw bytes (one allocation the size of the tensor).
fn read_bytes(
    file: &mut File,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
) -> candle_core::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = vec![0u8; seek_tensor(file, info, data_offset)?];
    file.read_exact(&mut out)?;
    Ok(out)
}

/// Reorders the rows (or elements, for a 1-D bias) of a tensor from llama.cpp's interleaved rotary
/// layout back to Hugging Face's half-split layout: GGUF row `h·d + 2j + i` becomes row `h·d + i·d/2 + j`.
fn permute_rows(q: &QTensor, n_heads: usize) -> Result<QTensor> {
    // A bias (rank 1) permutes f32 elements (GGUF biases are F32), a matrix its rows.
    if q.shape().rank() == 1 && q.dtype() != GgmlDType::F32 {
        return Err(candle_core::Error::Msg(format!(
            "rank-1 Q/K tensor of type {:?} cannot be permuted",
            q.dtype()
        ))
        .into());
    }
    let rows = q.shape().dims()[0];
    let data = q.data()?;
    let out = permute_row_bytes(&data, rows, n_heads);
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// [`permute_rows`] on raw bytes: `data` holds `rows` rows of equal size.
fn permute_row_bytes(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                let src = h * head_dim + 2 * j + i;
                let dst = h * head_dim + i * half + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

impl Weights for GgufWeights {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn contains(&self, name: &str) -> bool {
        hf_to_gguf_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let q = self.qtensor(name, shape)?;
        Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let b = if bias {
            Some(self.tensor(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        let hf = format!("{name}.weight");
        if let Some(q) = self.repacked(&hf, out_dim, in_dim)? {
            return Linear::quantized_as(Arc::new(q), b, flywheel_kernels::Layout::Rows4);
        }
        let w = self.qtensor(&hf, &[out_dim, in_dim])?;
        match w.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Linear::dense(w.dequantize(&self.device)?.to_dtype(self.dtype)?, b)
            }
            _ => Linear::quantized(Arc::new(w), b),
        }
    }
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let w = self.qtensor(&format!("{name}.weight"), &[vocab, hidden])?;
        Ok(match w.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Embedding::Dense(w.dequantize(&self.device)?.to_dtype(self.dtype)?)
            }
            _ => Embedding::Quantized(Arc::new(w)),
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn tensor_data_outside_the_file_misaligned_or_overlapping_is_refused() {
        use candle_core::quantized::GgmlDType;
        let content = |tensors: &[(&str, u64, usize)]| gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: Default::default(),
            tensor_infos: tensors
                .iter()
                .map(|&(n, offset, elems)| {
                    let info = gguf_file::TensorInfo {
                        ggml_dtype: GgmlDType::F32,
                        shape: candle_core::Shape::from(elems),
                        offset,
                    };
                    (n.to_string(), info)
                })
                .collect(),
            tensor_data_offset: 64,
        };
        // Two 16-float tensors (64 bytes each) after a 64-byte header: 192 bytes.
        let ok = content(&[("a", 0, 16), ("b", 64, 16)]);
        assert!(check_tensor_layout(&ok, 192).is_ok());
        let err = check_tensor_layout(&ok, 150).unwrap_err();
        assert!(err.contains("`b`") && err.contains("past the end"), "{err}");
        let err = check_tensor_layout(&content(&[("a", 0, 16), ("b", 32, 16)]), 192).unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        let err = check_tensor_layout(&content(&[("a\u{1b}[2J", 8, 16)]), 192).unwrap_err();
        assert!(err.contains("aligned") && !err.contains('\u{1b}'), "{err}");
    }

    use super::*;

    #[test]
    fn names_map_onto_llama_cpp_names() {
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.q_proj.bias").as_deref(),
            Some("blk.12.attn_q.bias")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.1.mystery.weight"), None);
    }

    #[test]
    fn row_permutation_inverts_llama_cpp_permute() -> anyhow::Result<()> {
        // llama.cpp: w.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(...)
        let (n_head, d, cols) = (2usize, 4usize, 3usize);
        let hf: Vec<f32> = (0..n_head * d * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let src = h * d + i * d / 2 + j; // HF row
                    let dst = h * d + 2 * j + i; // GGUF row
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_vec(gguf, (n_head * d, cols), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        let back = permute_rows(&q, n_head)?.dequantize(&Device::Cpu)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, hf);
        Ok(())
    }
}

/// Tensors held in memory under Hugging Face names: tests, and benchmarks with random weights
/// in a real architecture's shape.
#[derive(Debug, Clone)]
pub struct MemoryWeights {
    /// The tensors by name.
    pub tensors: std::collections::HashMap<String, Tensor>,
    device: Device,
    dtype: DType,
}

impl MemoryWeights {
    /// An empty set on `device`, converting to `dtype` on access.
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self {
            tensors: Default::default(),
            device: device.clone(),
            dtype,
        }
    }

    /// Seeded random weights for a decoder config (normal·0.02 matrices, norms near 1),
    /// identical for equal seeds on every machine.
    pub fn random_decoder(
        cfg: &crate::DecoderConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut w = Self::new(device, dtype);
        let mut rng = SplitMix(seed);
        let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let mut put = |name: String, shape: Vec<usize>, scale: f32, base: f32| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| base + scale * rng.normal()).collect();
            w.tensors.insert(name, Tensor::from_vec(v, shape, device)?);
            Ok(())
        };
        put(
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            0.5,
            0.0,
        )?;
        put("model.norm.weight".into(), vec![h], 0.1, 1.0)?;
        if !cfg.tie_word_embeddings {
            put("lm_head.weight".into(), vec![cfg.vocab_size, h], 0.2, 0.0)?;
        }
        let s = 0.2f32;
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), vec![h], 0.1, 1.0)?;
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.1,
                1.0,
            )?;
            put(
                format!("{p}.self_attn.q_proj.weight"),
                vec![cfg.num_heads * hd, h],
                s,
                0.0,
            )?;
            put(
                format!("{p}.self_attn.k_proj.weight"),
                vec![cfg.num_kv_heads * hd, h],
                s,
                0.0,
            )?;
            put(
                format!("{p}.self_attn.v_proj.weight"),
                vec![cfg.num_kv_heads * hd, h],
                s,
                0.0,
            )?;
            put(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, cfg.num_heads * hd],
                s,
                0.0,
            )?;
            if cfg.attention_bias {
                put(
                    format!("{p}.self_attn.q_proj.bias"),
                    vec![cfg.num_heads * hd],
                    s,
                    0.0,
                )?;
                put(
                    format!("{p}.self_attn.k_proj.bias"),
                    vec![cfg.num_kv_heads * hd],
                    s,
                    0.0,
                )?;
                put(
                    format!("{p}.self_attn.v_proj.bias"),
                    vec![cfg.num_kv_heads * hd],
                    s,
                    0.0,
                )?;
            }
            put(format!("{p}.mlp.gate_proj.weight"), vec![i, h], s, 0.0)?;
            put(format!("{p}.mlp.up_proj.weight"), vec![i, h], s, 0.0)?;
            put(format!("{p}.mlp.down_proj.weight"), vec![h, i], s, 0.0)?;
        }
        Ok(w)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: "(memory)".into(),
        })?;
        check_shape(name, "(memory)", t.dims(), shape)?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// A tiny deterministic generator (SplitMix64 + Box–Muller) so random models need no RNG crate.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

impl Weights for MemoryWeights {
    fn describe(&self) -> String {
        "(memory)".into()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let w = self.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let b = if bias {
            Some(self.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Linear::dense(w, b)
    }
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::Dense(
            self.get(&format!("{name}.weight"), &[vocab, hidden])?,
        ))
    }
}

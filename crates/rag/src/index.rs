//! Ingest: walk a folder (include/exclude globs), read txt/md/html, extract, chunk by the
//! embedding model's tokens, embed, and write the store in one transaction. Re-runs are
//! incremental: files whose bytes hash the same are skipped, changed files are replaced,
//! files gone from the folder are removed. Unreadable, binary and oversized files are skipped
//! with a warning naming them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flywheel_runtime::EmbeddingModel;
use sha2::{Digest, Sha256};

use crate::chunk::{chunk_document, ChunkConfig};
use crate::extract::{extract, DocKind};
use crate::search::{build_ann, passage_text};
use crate::store::{NewChunk, Store};
use crate::{Error, Result};

/// How a folder is indexed.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Globs (relative paths) a file must match to be indexed; empty means every supported file.
    pub include: Vec<String>,
    /// Globs of files to leave out.
    pub exclude: Vec<String>,
    /// How documents are cut.
    pub chunk: ChunkConfig,
    /// Files larger than this are skipped with a warning.
    pub max_file_bytes: u64,
    /// Texts per embedding batch.
    pub batch_size: usize,
    /// Build an HNSW graph when the store holds at least this many chunks.
    pub ann_threshold: usize,
    /// Drop everything and index from scratch.
    pub rebuild: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            include: Vec::new(),
            exclude: Vec::new(),
            chunk: ChunkConfig::default(),
            max_file_bytes: 10 * 1024 * 1024,
            batch_size: 32,
            ann_threshold: 50_000,
            rebuild: false,
        }
    }
}

/// What an index run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IndexReport {
    /// Supported files found under the folder (after globs).
    pub files: usize,
    /// Documents new to the store.
    pub added: usize,
    /// Documents whose content changed.
    pub updated: usize,
    /// Documents left as they were.
    pub unchanged: usize,
    /// Documents removed because their file is gone.
    pub removed: usize,
    /// Files skipped, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Chunks written in this run.
    pub chunks_written: usize,
    /// Chunks in the store afterwards.
    pub chunks_total: usize,
    /// Seconds spent embedding.
    pub embed_s: f64,
    /// Seconds for the whole run.
    pub total_s: f64,
    /// Whether an HNSW graph was built.
    pub ann: bool,
}

/// Progress events of an index run.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// The folder was walked; this many files need (re)indexing.
    Planned {
        /// Files to read and embed.
        to_index: usize,
    },
    /// A file was skipped.
    Skipped {
        /// Its path.
        path: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// A document was written (inside the run's transaction).
    Written {
        /// Its path.
        path: &'a str,
        /// Files done so far.
        done: usize,
        /// Chunks written so far.
        chunks: usize,
    },
    /// Chunks embedded so far in the current batch of documents (a large file reports often).
    Embedding {
        /// The document being embedded.
        path: &'a str,
        /// Chunks of the batch embedded.
        done: usize,
        /// Chunks in the batch.
        total: usize,
    },
    /// Building the HNSW graph.
    BuildingAnn {
        /// Vectors in it.
        vectors: usize,
    },
}

struct Pending {
    rel: String,
    kind: DocKind,
    hash: String,
    bytes: usize,
    title: Option<String>,
    text: String,
    chunks: Vec<crate::chunk::Chunk>,
}

fn globs(list: &[String], what: &'static str) -> Result<Option<globset::GlobSet>> {
    if list.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in list {
        b.add(globset::Glob::new(g).map_err(|e| Error::BadOption {
            option: what,
            reason: format!("`{g}`: {e}"),
        })?);
    }
    Ok(Some(b.build().map_err(|e| Error::BadOption {
        option: what,
        reason: e.to_string(),
    })?))
}

/// The embedder's identity as recorded in a store.
pub fn embedder_id(e: &EmbeddingModel) -> String {
    format!(
        "{} (dim {}, max {} tokens)",
        e.info().path,
        e.info().hidden_size,
        e.max_len()
    )
}

/// Indexes `root` into `store`.
pub fn index_folder(
    store: &mut Store,
    root: &Path,
    embedder: &EmbeddingModel,
    opts: &IndexOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<IndexReport> {
    let t0 = Instant::now();
    // One indexing process per store.
    let _lock = flywheel_api::lock::FolderLock::file(store.path())?;
    opts.chunk.validate().map_err(|reason| Error::BadOption {
        option: "chunk",
        reason,
    })?;
    if !root.is_dir() {
        return Err(Error::Io {
            path: root.display().to_string(),
            reason: "not a folder".into(),
        });
    }
    let include = globs(&opts.include, "include")?;
    let exclude = globs(&opts.exclude, "exclude")?;
    let root_abs = std::fs::canonicalize(root).map_err(|e| Error::Io {
        path: root.display().to_string(),
        reason: e.to_string(),
    })?;
    let settings = serde_json::json!({
        "embedder": embedder_id(embedder),
        "chunk": opts.chunk,
    })
    .to_string();
    let mut report = IndexReport::default();
    let writer = store.writer()?;
    let root_str = root_abs.display().to_string();
    let mut rebuild = opts.rebuild;
    match (writer.meta("root")?, writer.meta("settings")?) {
        (Some(r), _) if r != root_str && !rebuild => {
            return Err(Error::Store {
                path: "(store)".into(),
                reason: format!(
                    "this store indexes {r}, not {root_str}; use another store or --rebuild"
                ),
            })
        }
        (_, Some(s)) if s != settings && !rebuild => {
            // The embedder or chunking changed: every vector must be redone.
            rebuild = true;
        }
        _ => {}
    }
    if rebuild {
        writer.clear()?;
    }
    writer.set_meta("root", &root_str)?;
    writer.set_meta("settings", &settings)?;
    // Recorded absolute, so the store opens its embedder from any working directory.
    let embedder_path = std::fs::canonicalize(&embedder.info().path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| embedder.info().path.clone());
    writer.set_meta("embedder_path", &embedder_path)?;
    // Walk, in a stable order. Folders that cannot be read are remembered: what the store
    // holds under them is kept, not taken for deleted.
    let mut files: Vec<(String, PathBuf, DocKind)> = Vec::new();
    let mut unreadable: Vec<String> = Vec::new();
    for entry in walkdir::WalkDir::new(&root_abs)
        .sort_by_file_name()
        .follow_links(false)
    {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let p = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                if let Some(dir) = e.path() {
                    unreadable.push(relative(dir, &root_abs));
                }
                report.skipped.push((p.clone(), e.to_string()));
                progress(Progress::Skipped {
                    path: &p,
                    reason: &e.to_string(),
                });
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let Some(kind) = DocKind::from_path(entry.path()) else {
            continue;
        };
        // A name that is not UTF-8 would be stored lossily, and two such names could collide
        // on one document: skipped, and named in the warning.
        if entry
            .path()
            .strip_prefix(&root_abs)
            .ok()
            .and_then(|p| p.to_str())
            .is_none()
        {
            let shown = flywheel_api::text::escape(&entry.path().display().to_string(), 300);
            skip(&mut report, progress, &shown, "the file name is not UTF-8");
            continue;
        }
        let rel = relative(entry.path(), &root_abs);
        if include.as_ref().is_some_and(|g| !g.is_match(&rel))
            || exclude.as_ref().is_some_and(|g| g.is_match(&rel))
        {
            continue;
        }
        files.push((rel, entry.path().to_path_buf(), kind));
    }
    report.files = files.len();
    let existing = writer.documents()?;
    // Remove documents whose file is gone (or now excluded), never those under a folder that
    // could not be read.
    let present: std::collections::HashSet<&str> = files.iter().map(|f| f.0.as_str()).collect();
    for (path, (id, _)) in &existing {
        if is_gone(path, &present, &unreadable) {
            writer.delete_document(*id)?;
            report.removed += 1;
        }
    }
    // Read and hash; keep what changed (the bytes are read again when the file's turn comes,
    // so memory holds one file at a time, not the folder).
    let mut todo: Vec<(String, PathBuf, DocKind)> = Vec::new();
    for (rel, path, kind) in files {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                skip(&mut report, progress, &rel, &e.to_string());
                continue;
            }
        };
        if meta.len() > opts.max_file_bytes {
            skip(&mut report, progress, &rel, &too_big(meta.len(), opts));
            continue;
        }
        let hash = match read_hashed(&path) {
            Ok((_, h)) => h,
            Err(e) => {
                skip(&mut report, progress, &rel, &e.to_string());
                continue;
            }
        };
        if existing.get(&rel).is_some_and(|(_, h)| *h == hash) {
            report.unchanged += 1;
            continue;
        }
        todo.push((rel, path, kind));
    }
    progress(Progress::Planned {
        to_index: todo.len(),
    });
    let model_max = embedder.max_len().saturating_sub(2).max(8);
    let mut done = 0usize;
    let mut pending: Vec<Pending> = Vec::new();
    let mut pending_chunks = 0usize;
    for (rel, path, kind) in todo {
        // Hashed again: the file may have changed since the walk, and the store must record
        // the hash of the text it holds (and it may have grown past the limit).
        if let Ok(m) = std::fs::metadata(&path) {
            if m.len() > opts.max_file_bytes {
                skip(&mut report, progress, &rel, &too_big(m.len(), opts));
                continue;
            }
        }
        let (bytes, hash) = match read_hashed(&path) {
            Ok(r) => r,
            Err(e) => {
                skip(&mut report, progress, &rel, &e.to_string());
                continue;
            }
        };
        if bytes[..bytes.len().min(8192)].contains(&0) {
            skip(
                &mut report,
                progress,
                &rel,
                "binary file (contains NUL bytes)",
            );
            continue;
        }
        let content = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                let why = format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                );
                skip(&mut report, progress, &rel, &why);
                continue;
            }
        };
        let ex = extract(kind, &content);
        if ex.text.trim().is_empty() {
            skip(&mut report, progress, &rel, "no text after extraction");
            continue;
        }
        let mut tok_err = None;
        let chunks = chunk_document(
            &ex,
            &opts.chunk,
            &mut |s| match embedder.token_offsets(s) {
                Ok(o) => o,
                Err(e) => {
                    tok_err = Some(e);
                    Vec::new()
                }
            },
            &mut |heading| {
                let trail = if heading.is_empty() {
                    0
                } else {
                    embedder
                        .token_offsets(&format!("{heading}\n\n"))
                        .map_or(0, |o| o.len())
                };
                model_max.saturating_sub(trail)
            },
        );
        if let Some(e) = tok_err {
            return Err(e.into());
        }
        pending_chunks += chunks.len();
        pending.push(Pending {
            rel,
            kind,
            hash,
            bytes: content.len(),
            title: ex.title.clone(),
            text: ex.text,
            chunks,
        });
        if pending_chunks >= opts.batch_size * 8 {
            flush(
                &writer,
                embedder,
                opts,
                &mut pending,
                &existing,
                &mut report,
                &mut done,
                progress,
            )?;
            pending_chunks = 0;
        }
    }
    flush(
        &writer,
        embedder,
        opts,
        &mut pending,
        &existing,
        &mut report,
        &mut done,
        progress,
    )?;
    let generation: i64 = writer
        .meta("generation")?
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
        + 1;
    writer.set_meta("generation", &generation.to_string())?;
    let vectors = writer.vectors()?;
    report.chunks_total = vectors.ids.len();
    if vectors.ids.len() >= opts.ann_threshold.max(1) {
        progress(Progress::BuildingAnn {
            vectors: vectors.ids.len(),
        });
        let ann = build_ann(&vectors);
        let blob = bincode::serialize(&ann).map_err(|e| Error::Store {
            path: "(hnsw)".into(),
            reason: e.to_string(),
        })?;
        writer.set_ann(generation, Some(&blob))?;
        report.ann = true;
    } else {
        writer.set_ann(generation, None)?;
    }
    writer.commit()?;
    report.total_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Why a file of `len` bytes is skipped.
fn too_big(len: u64, opts: &IndexOptions) -> String {
    format!(
        "{len} bytes is over the {}-byte limit (--max-file-bytes)",
        opts.max_file_bytes
    )
}

/// A file's bytes and their sha256 (hex).
fn read_hashed(path: &Path) -> std::io::Result<(Vec<u8>, String)> {
    let bytes = std::fs::read(path)?;
    let hash = format!("{:x}", Sha256::digest(&bytes));
    Ok((bytes, hash))
}

/// `path` relative to `root`, with `/` separators.
fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether a stored document's file is gone: not found by the walk, and not under a folder
/// the walk could not read (`""` is the root itself).
fn is_gone(path: &str, present: &std::collections::HashSet<&str>, unreadable: &[String]) -> bool {
    !present.contains(path)
        && !unreadable
            .iter()
            .any(|d| d.is_empty() || path == d || path.starts_with(&format!("{d}/")))
}

fn skip(report: &mut IndexReport, progress: &mut dyn FnMut(Progress<'_>), path: &str, why: &str) {
    report.skipped.push((path.to_string(), why.to_string()));
    progress(Progress::Skipped { path, reason: why });
}

/// Embeds every pending document's chunks, writes them and reports each document written.
#[allow(clippy::too_many_arguments)]
fn flush(
    writer: &crate::store::Writer<'_>,
    embedder: &EmbeddingModel,
    opts: &IndexOptions,
    pending: &mut Vec<Pending>,
    existing: &HashMap<String, (i64, String)>,
    report: &mut IndexReport,
    done: &mut usize,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    // Embedded a window at a time: the tokenizer's encodings of a window are all that is held
    // besides the vectors, and a large file reports its progress as it goes.
    let all: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .flat_map(|(d, p)| (0..p.chunks.len()).map(move |c| (d, c)))
        .collect();
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(all.len());
    for window in all.chunks(opts.batch_size.max(1) * 8) {
        let texts: Vec<String> = window
            .iter()
            .map(|&(d, c)| {
                let (p, ch) = (&pending[d], &pending[d].chunks[c]);
                passage_text(&ch.heading, &p.text[ch.start..ch.end])
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        vectors.extend(embedder.embed_all(&refs, opts.batch_size)?);
        let last = window.last().expect("windows are not empty").0;
        progress(Progress::Embedding {
            path: &pending[last].rel,
            done: vectors.len(),
            total: all.len(),
        });
    }
    let mut vectors = vectors.into_iter();
    for p in pending.drain(..) {
        let chunks: Vec<NewChunk> = p
            .chunks
            .iter()
            .enumerate()
            .map(|(ord, c)| NewChunk {
                ord,
                span: (c.start, c.end),
                lines: (c.line_start, c.line_end),
                heading: c.heading.clone(),
                text: p.text[c.start..c.end].to_string(),
                vector: vectors.next().expect("one vector per chunk"),
            })
            .collect();
        writer.put_document(
            &p.rel,
            p.kind.name(),
            &p.hash,
            p.bytes,
            p.title.as_deref(),
            &p.text,
            &chunks,
        )?;
        if existing.contains_key(&p.rel) {
            report.updated += 1;
        } else {
            report.added += 1;
        }
        *done += 1;
        report.chunks_written += chunks.len();
        progress(Progress::Written {
            path: &p.rel,
            done: *done,
            chunks: report.chunks_written,
        });
    }
    report.embed_s += t.elapsed().as_secs_f64();
    Ok(())
}

#[cfg(test)]
mod gone_tests {
    use super::*;

    #[test]
    fn documents_under_unreadable_folders_are_not_gone() {
        let present: std::collections::HashSet<&str> = ["a.md", "sub/b.md"].into_iter().collect();
        let unreadable = vec!["locked".to_string()];
        assert!(!is_gone("a.md", &present, &unreadable));
        assert!(is_gone("deleted.md", &present, &unreadable));
        assert!(!is_gone("locked/c.md", &present, &unreadable));
        assert!(!is_gone("locked/deep/d.md", &present, &unreadable));
        assert!(
            is_gone("lockedness/e.md", &present, &unreadable),
            "a prefix of a name is not a folder"
        );
        assert!(
            !is_gone("anything.md", &present, &[String::new()]),
            "an unreadable root keeps all"
        );
    }
}

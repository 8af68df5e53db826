//! Retrieval end to end on tiny random models (an embedder and a generator written in the
//! test), plus a few checks with the real all-MiniLM-L6-v2 where semantics matter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use flywheel_rag::answer::{ask_quiet, AskOptions, DONT_KNOW};
use flywheel_rag::index::Progress;
use flywheel_rag::{
    index_folder, DenseIndex, Filter, IndexOptions, IndexReport, Llm, Mode, SearchOptions,
    Searcher, Store,
};
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_tiny_bert_folder};
use flywheel_runtime::{EmbeddingModel, LoadOptions, TextModel};

struct Fixture {
    _dir: tempfile::TempDir,
    docs: PathBuf,
    store: PathBuf,
    embedder: EmbeddingModel,
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

const INSTALL: &str = "# Installing packages\n\nUse pip to install packages from the package index: `pip install requests`.\n\nA virtual environment keeps the packages of one project apart.\n";
const DEBUG: &str = "Debugging\n\nThe pdb module is the standard debugger. Call breakpoint() to stop the program and inspect variables.\n";
const HTML: &str = "<html><head><title>Lists</title><script>var ignored = 1;</script></head><body><h1>Lists</h1><p>A list comprehension builds a list from an iterable: <code>[x*x for x in range(10)]</code>.</p><h2>Sorting</h2><p>Use sorted() or list.sort() to order items.</p></body></html>";

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    write(&docs.join("guides/install.md"), INSTALL);
    write(&docs.join("guides/debug.txt"), DEBUG);
    write(&docs.join("ref/lists.html"), HTML);
    let emb_dir = dir.path().join("bert");
    write_tiny_bert_folder(&emb_dir, 11).unwrap();
    let embedder =
        EmbeddingModel::load(emb_dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    Fixture {
        store: dir.path().join("kb.sqlite"),
        docs,
        embedder,
        _dir: dir,
    }
}

fn small_chunks() -> IndexOptions {
    IndexOptions {
        chunk: flywheel_rag::ChunkConfig {
            max_tokens: 24,
            overlap_tokens: 4,
        },
        ..IndexOptions::default()
    }
}

fn run_index(f: &Fixture, opts: &IndexOptions, warnings: &mut Vec<String>) -> IndexReport {
    let mut store = Store::open(&f.store).unwrap();
    index_folder(&mut store, &f.docs, &f.embedder, opts, &mut |p| {
        if let Progress::Skipped { path, reason } = p {
            warnings.push(format!("{path}: {reason}"));
        }
    })
    .unwrap()
}

fn chunk_ids_by_path(store: &Store) -> HashMap<String, Vec<i64>> {
    let v = store.vectors().unwrap();
    let docs = store.documents().unwrap();
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, doc) in v.ids.iter().zip(&v.docs) {
        let path = docs.values().find(|d| d.id == *doc).unwrap().path.clone();
        out.entry(path).or_default().push(*id);
    }
    out
}

#[test]
fn reindex_touches_only_changed_files_and_removes_deleted_ones() {
    let f = fixture();
    let mut w = Vec::new();
    let r1 = run_index(&f, &small_chunks(), &mut w);
    assert_eq!(
        (r1.files, r1.added, r1.updated, r1.unchanged, r1.removed),
        (3, 3, 0, 0, 0)
    );
    assert!(r1.chunks_total >= 3);
    let before = chunk_ids_by_path(&Store::open(&f.store).unwrap());

    let r2 = run_index(&f, &small_chunks(), &mut w);
    assert_eq!(
        (
            r2.added,
            r2.updated,
            r2.unchanged,
            r2.removed,
            r2.chunks_written
        ),
        (0, 0, 3, 0, 0)
    );

    write(
        &f.docs.join("guides/debug.txt"),
        &format!("{DEBUG}\nUse post_mortem() after a crash.\n"),
    );
    std::fs::remove_file(f.docs.join("ref/lists.html")).unwrap();
    write(
        &f.docs.join("ref/new.md"),
        "# New\n\nBrand new page about sets.\n",
    );
    let r3 = run_index(&f, &small_chunks(), &mut w);
    assert_eq!(
        (r3.added, r3.updated, r3.unchanged, r3.removed),
        (1, 1, 1, 1)
    );
    let store = Store::open(&f.store).unwrap();
    let after = chunk_ids_by_path(&store);
    // The unchanged file keeps its very rows; the changed one got new ones; the deleted one is gone.
    assert_eq!(after["guides/install.md"], before["guides/install.md"]);
    assert!(after["guides/debug.txt"]
        .iter()
        .all(|id| !before["guides/debug.txt"].contains(id)));
    assert!(!after.contains_key("ref/lists.html"));
    assert!(
        store.bm25("sorted", 5, None).unwrap().is_empty(),
        "deleted text left in the FTS index"
    );
    assert_eq!(store.bm25("post_mortem", 5, None).unwrap().len(), 1);
    store.check().unwrap();
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn chunk_spans_point_at_the_stored_text() {
    let f = fixture();
    run_index(&f, &small_chunks(), &mut Vec::new());
    let store = Store::open(&f.store).unwrap();
    let v = store.vectors().unwrap();
    let chunks = store.chunks(&v.ids).unwrap();
    assert_eq!(chunks.len(), v.ids.len());
    for c in &chunks {
        let text = store.document_text(&c.path).unwrap().unwrap();
        assert_eq!(&text[c.span.0..c.span.1], c.text, "{}", c.path);
        let line = text[..c.span.0].matches('\n').count() + 1;
        assert_eq!(line, c.lines.0);
    }
    // The HTML page lost its tags and script, and its headings became trails.
    let html: Vec<_> = chunks
        .iter()
        .filter(|c| c.path == "ref/lists.html")
        .collect();
    assert!(html
        .iter()
        .all(|c| !c.text.contains('<') && !c.text.contains("ignored")));
    assert!(
        html.iter().any(|c| c.heading == "Lists › Sorting"),
        "{:?}",
        html.iter().map(|c| &c.heading).collect::<Vec<_>>()
    );
    // Markdown is stored byte for byte.
    assert_eq!(
        store.document_text("guides/install.md").unwrap().unwrap(),
        INSTALL
    );
}

#[test]
fn bad_files_are_skipped_with_a_warning_naming_them() {
    let f = fixture();
    std::fs::write(f.docs.join("blob.txt"), b"abc\x00\x01\x02binary").unwrap();
    std::fs::write(f.docs.join("latin1.md"), b"caf\xe9 au lait").unwrap();
    write(&f.docs.join("huge.txt"), &"word ".repeat(50_000));
    write(
        &f.docs.join("broken.html"),
        "<html><body><p>unclosed <b>bold <div>text & more <",
    );
    write(&f.docs.join("empty.md"), "   \n\n");
    write(
        &f.docs.join("image.png"),
        "not indexed: unsupported extension",
    );
    let opts = IndexOptions {
        max_file_bytes: 100_000,
        ..small_chunks()
    };
    let mut warnings = Vec::new();
    let r = run_index(&f, &opts, &mut warnings);
    let skipped: Vec<&str> = r.skipped.iter().map(|s| s.0.as_str()).collect();
    for name in ["blob.txt", "latin1.md", "huge.txt", "empty.md"] {
        assert!(
            skipped.contains(&name),
            "{name} not skipped: {:?}",
            r.skipped
        );
        assert!(
            warnings.iter().any(|w| w.starts_with(name)),
            "no warning for {name}: {warnings:?}"
        );
    }
    assert!(warnings
        .iter()
        .any(|w| w.contains("latin1.md") && w.contains("UTF-8")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("huge.txt") && w.contains("limit")));
    // The malformed HTML is tolerated and indexed; the png is not a document at all.
    let store = Store::open(&f.store).unwrap();
    let docs = store.documents().unwrap();
    assert!(docs.contains_key("broken.html"));
    assert!(!docs.contains_key("image.png"));
    assert_eq!(r.added, 4);
}

#[test]
fn bm25_finds_the_obvious_document_and_filters_apply() {
    let f = fixture();
    run_index(&f, &small_chunks(), &mut Vec::new());
    let store = Store::open(&f.store).unwrap();
    let dense = DenseIndex::load(&store).unwrap();
    let s = Searcher::new(&store, &dense, &f.embedder);
    let opts = |mode, filter: &[&str]| SearchOptions {
        mode,
        top_k: 3,
        filter: Filter::parse(&filter.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap(),
        ..SearchOptions::default()
    };
    let hits = s
        .search("how do I install packages with pip", &opts(Mode::Bm25, &[]))
        .unwrap()
        .hits;
    assert_eq!(hits[0].path, "guides/install.md");
    let hits = s
        .search("debugger breakpoint", &opts(Mode::Bm25, &[]))
        .unwrap()
        .hits;
    assert_eq!(hits[0].path, "guides/debug.txt");
    // Hybrid keeps BM25's clear winner on top even with a random embedder.
    let hits = s
        .search("pdb debugger breakpoint", &opts(Mode::Hybrid, &[]))
        .unwrap()
        .hits;
    assert_eq!(hits[0].path, "guides/debug.txt");
    // Filters: by path glob and by kind, for every mode.
    for mode in [Mode::Dense, Mode::Bm25, Mode::Hybrid] {
        let hits = s
            .search("list packages debugger", &opts(mode, &["path=ref/*"]))
            .unwrap()
            .hits;
        assert!(!hits.is_empty());
        assert!(
            hits.iter().all(|h| h.path.starts_with("ref/")),
            "{mode:?}: {hits:?}"
        );
        let hits = s
            .search("list packages debugger", &opts(mode, &["kind=markdown"]))
            .unwrap()
            .hits;
        assert!(hits.iter().all(|h| h.path.ends_with(".md")), "{mode:?}");
    }
    // The api's Retriever trait over the same store.
    let mut r = flywheel_rag::StoreRetriever {
        searcher: Searcher::new(&store, &dense, &f.embedder),
        options: opts(Mode::Bm25, &[]),
    };
    let hits = flywheel_api::Retriever::retrieve(&mut r, "install packages with pip", 2).unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].path, "guides/install.md");
    // Dense results come back in cosine order.
    let hits = s.search("anything", &opts(Mode::Dense, &[])).unwrap().hits;
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    // MMR returns top_k distinct chunks.
    let mut o = opts(Mode::Hybrid, &[]);
    o.mmr = Some(0.5);
    let hits = s.search("packages", &o).unwrap().hits;
    let mut ids: Vec<i64> = hits.iter().map(|h| h.chunk_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), hits.len());
}

fn tiny_generator(dir: &Path) -> TextModel {
    let mut cfg = tiny_config(flywheel_models::Architecture::Llama);
    // Room for retrieval prompts (the byte-level tiny vocabulary spends a token per byte).
    cfg.max_position_embeddings = 4096;
    let path = dir.join("tiny.gguf");
    write_gguf(
        &path,
        &cfg,
        &tiny_weights(&cfg, 3).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    TextModel::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn hyde_decompose_and_rerank_run_with_a_tiny_model() {
    let f = fixture();
    run_index(&f, &small_chunks(), &mut Vec::new());
    let store = Store::open(&f.store).unwrap();
    let dense = DenseIndex::load(&store).unwrap();
    let model = tiny_generator(f._dir.path());
    let llm = Llm::new(&model);
    let plain = Searcher::new(&store, &dense, &f.embedder);
    let needs = plain
        .search(
            "q",
            &SearchOptions {
                hyde: true,
                ..SearchOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        needs.contains("--hyde") && needs.contains("--model"),
        "{needs}"
    );
    let s = Searcher::new(&store, &dense, &f.embedder)
        .with_llm(&llm)
        .with_reranker(&llm);
    let o = SearchOptions {
        hyde: true,
        rerank: true,
        rerank_candidates: 4,
        decompose: true,
        top_k: 3,
        ..SearchOptions::default()
    };
    let r = s
        .search("install packages and use the debugger", &o)
        .unwrap();
    assert!(r.hyde_text.is_some());
    assert_eq!(r.hits.len(), 3);
    // Rerank scores are probabilities, best first.
    assert!(r.hits.iter().all(|h| (0.0..=1.0).contains(&h.score)));
    assert!(r.hits.windows(2).all(|w| w[0].score >= w[1].score));
    // HyDE changes the query vector (the hypothetical text's embedding joins the query's).
    let without = s
        .search("install packages", &SearchOptions::default())
        .unwrap();
    let with = s
        .search(
            "install packages",
            &SearchOptions {
                hyde: true,
                ..SearchOptions::default()
            },
        )
        .unwrap();
    assert_ne!(without.query_vector, with.query_vector);
    let n: f32 = with.query_vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((n - 1.0).abs() < 1e-4);
}

#[test]
fn ask_cites_only_passages_that_exist_and_declines_without_context() {
    let f = fixture();
    run_index(&f, &small_chunks(), &mut Vec::new());
    let store = Store::open(&f.store).unwrap();
    let dense = DenseIndex::load(&store).unwrap();
    let model = tiny_generator(f._dir.path());
    let llm = Llm::new(&model);
    let s = Searcher::new(&store, &dense, &f.embedder)
        .with_llm(&llm)
        .with_reranker(&llm);
    let opts = AskOptions {
        max_tokens: 24,
        min_similarity: 0.0,
        fact_check: true,
        ..AskOptions::default()
    };
    let a = ask_quiet(&s, &llm, "How do I install packages?", &opts).unwrap();
    assert!(!a.context.is_empty());
    assert!(a.cited.iter().all(|&n| n >= 1 && n <= a.context.len()));
    assert!(a
        .invalid_citations
        .iter()
        .all(|&n| n == 0 || n > a.context.len()));
    // Every passage given to the model is a real chunk of the store, byte for byte.
    let ids: Vec<i64> = a.context.iter().map(|c| c.chunk_id).collect();
    let stored = store.chunks(&ids).unwrap();
    assert_eq!(stored.len(), ids.len());
    for (c, st) in a.context.iter().zip(&stored) {
        assert_eq!(c.text, st.text);
    }
    let rendered = a.render();
    assert!(
        rendered.contains("guides/") || rendered.contains("ref/"),
        "{rendered}"
    );
    // Fact-check verdicts are probabilities.
    assert!(a.checks.iter().all(|c| (0.0..=1.0).contains(&c.support)));
    // Nothing similar enough: the answer is "I don't know", and the model is not asked.
    let strict = AskOptions {
        min_similarity: 1.5,
        ..opts
    };
    let a = ask_quiet(&s, &llm, "What is the airspeed of a swallow?", &strict).unwrap();
    assert!(a.declined);
    assert_eq!(a.text, DONT_KNOW);
    assert!(a.context.is_empty());
}

fn real_minilm() -> Option<EmbeddingModel> {
    if std::env::var("FLYWHEEL_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/all-minilm-l6-v2");
    assert!(
        root.is_dir(),
        "{} is missing: run scripts/fetch-models.sh",
        root.display()
    );
    Some(EmbeddingModel::load(root.to_str().unwrap(), &LoadOptions::default()).unwrap())
}

#[test]
fn dense_search_with_minilm_ranks_the_obvious_document_first() {
    let Some(embedder) = real_minilm() else {
        return;
    };
    let f = fixture();
    let mut store = Store::open(&f.store).unwrap();
    index_folder(
        &mut store,
        &f.docs,
        &embedder,
        &IndexOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let dense = DenseIndex::load(&store).unwrap();
    let s = Searcher::new(&store, &dense, &embedder);
    // Paraphrases that share few words with the documents.
    for (q, want) in [
        (
            "setting up third-party libraries for my project",
            "guides/install.md",
        ),
        (
            "stop execution and look at variables while the code runs",
            "guides/debug.txt",
        ),
        ("ordering the elements of a sequence", "ref/lists.html"),
    ] {
        for mode in [Mode::Dense, Mode::Hybrid] {
            let hits = s
                .search(
                    q,
                    &SearchOptions {
                        mode,
                        top_k: 3,
                        ..SearchOptions::default()
                    },
                )
                .unwrap()
                .hits;
            assert_eq!(hits[0].path, want, "{mode:?} {q}: {hits:?}");
        }
    }
}

#[test]
fn a_store_being_indexed_is_refused_to_a_second_indexer() {
    let f = fixture();
    let held = flywheel_api::lock::FolderLock::file(&f.store).unwrap();
    let mut store = Store::open(&f.store).unwrap();
    let err = index_folder(
        &mut store,
        &f.docs,
        &f.embedder,
        &small_chunks(),
        &mut |_| {},
    )
    .expect_err("refused while another indexer holds the store")
    .to_string();
    assert!(err.contains("kb.sqlite") && err.contains("in use"), "{err}");
    drop(held);
    index_folder(
        &mut store,
        &f.docs,
        &f.embedder,
        &small_chunks(),
        &mut |_| {},
    )
    .unwrap();
}

#[cfg(unix)]
#[test]
fn files_whose_names_are_not_utf8_are_skipped_with_a_warning() {
    use std::os::unix::ffi::OsStrExt;
    let f = fixture();
    // Two names that read alike once made lossy ("caf\u{fffd}.md").
    for b in [&b"caf\xe9.md"[..], &b"caf\xe8.md"[..]] {
        std::fs::write(
            f.docs.join(std::ffi::OsStr::from_bytes(b)),
            "Some text about cafes.",
        )
        .unwrap();
    }
    let mut warnings = vec![];
    let report = run_index(&f, &small_chunks(), &mut warnings);
    let named: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("not UTF-8"))
        .collect();
    assert_eq!(named.len(), 2, "{warnings:?}");
    let store = Store::open(&f.store).unwrap();
    assert!(
        !store
            .documents()
            .unwrap()
            .keys()
            .any(|k| k.contains('\u{fffd}')),
        "no lossy name stored"
    );
    assert!(report.files > 0);
}

#[test]
fn a_large_file_reports_its_embedding_progress_window_by_window() {
    let f = fixture();
    let para = "Lists hold items in order and grow as needed. ".repeat(6);
    let big: String = (0..60).map(|i| format!("Part {i}. {para}\n\n")).collect();
    write(&f.docs.join("big.md"), &big);
    let opts = IndexOptions {
        batch_size: 4,
        ..small_chunks()
    };
    let mut store = Store::open(&f.store).unwrap();
    let mut seen: Vec<(String, usize, usize)> = Vec::new();
    let report = index_folder(&mut store, &f.docs, &f.embedder, &opts, &mut |p| {
        if let Progress::Embedding { path, done, total } = p {
            seen.push((path.to_string(), done, total));
        }
    })
    .unwrap();
    // Windows of batch_size * 8 chunks: the big file alone spans several, each reported.
    let big_windows: Vec<&(String, usize, usize)> =
        seen.iter().filter(|(p, _, _)| p == "big.md").collect();
    assert!(big_windows.len() >= 2, "{seen:?}");
    for w in seen.windows(2) {
        if w[0].2 == w[1].2 && w[1].1 > w[0].1 {
            assert!(w[1].1 - w[0].1 <= 32, "{seen:?}");
        }
    }
    let last = seen.last().unwrap();
    assert_eq!(last.1, last.2, "the last window ends its batch");
    assert!(report.chunks_written > 32, "{report:?}");
}

//! The crate map of ARCHITECTURE.md, enforced: every dependency between workspace crates
//! (normal dependencies, not dev-dependencies) must be one the map allows, so no crate reaches
//! upward (e.g. a library into the server or the CLI, or the server into model internals).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Each workspace crate and the workspace crates it may depend on.
const ALLOWED: &[(&str, &[&str])] = &[
    ("flywheel-api", &[]),
    ("flywheel-kernels", &[]),
    ("flywheel-fused", &[]),
    ("flywheel-models", &["flywheel-kernels"]),
    (
        "flywheel-peft",
        &[
            "flywheel-api",
            "flywheel-models",
            "flywheel-fused",
            "flywheel-kernels",
        ],
    ),
    (
        "flywheel-runtime",
        &["flywheel-api", "flywheel-models", "flywheel-peft"],
    ),
    (
        "flywheel-train",
        &[
            "flywheel-api",
            "flywheel-models",
            "flywheel-peft",
            "flywheel-runtime",
        ],
    ),
    (
        "flywheel-rag",
        &["flywheel-api", "flywheel-runtime", "flywheel-kernels"],
    ),
    (
        "flywheel-eval",
        &[
            "flywheel-api",
            "flywheel-runtime",
            "flywheel-peft",
            "flywheel-rag",
        ],
    ),
    (
        "flywheel-serve",
        &[
            "flywheel-api",
            "flywheel-runtime",
            "flywheel-peft",
            "flywheel-rag",
        ],
    ),
    (
        "flywheel",
        &[
            "flywheel-api",
            "flywheel-runtime",
            "flywheel-peft",
            "flywheel-train",
            "flywheel-serve",
            "flywheel-rag",
            "flywheel-eval",
        ],
    ),
];

/// `(crate, its workspace dependencies)` as `cargo metadata` reports them.
fn workspace_edges() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = v["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null()) // normal dependencies only
                .filter_map(|d| d["name"].as_str())
                .filter(|n| names.contains(*n))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn no_crate_depends_on_one_the_map_does_not_allow() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(c, deps)| (*c, deps.iter().copied().collect()))
        .collect();
    let edges = workspace_edges();
    assert!(edges.len() >= 11, "expected the whole workspace: {edges:?}");
    let mut bad = Vec::new();
    for (krate, deps) in &edges {
        let Some(ok) = allowed.get(krate.as_str()) else {
            bad.push(format!(
                "{krate} is not on the crate map (add it to ARCHITECTURE.md and this test)"
            ));
            continue;
        };
        for d in deps {
            if !ok.contains(d.as_str()) {
                bad.push(format!("{krate} -> {d}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "edges the crate map does not allow:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_crate_map_has_no_cycle() {
    // Depth-first over ALLOWED: a cycle in the map itself would make "upward" meaningless.
    let map: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    fn visit<'a>(n: &'a str, map: &BTreeMap<&'a str, &'a [&'a str]>, path: &mut Vec<&'a str>) {
        assert!(!path.contains(&n), "cycle: {path:?} -> {n}");
        path.push(n);
        for d in map.get(n).copied().unwrap_or(&[]) {
            visit(d, map, path);
        }
        path.pop();
    }
    for n in map.keys() {
        visit(n, &map, &mut Vec::new());
    }
}

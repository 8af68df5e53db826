//! Seeded mutation fuzzing of the eval-spec parser: the shipped specs with random edits parse
//! or fail with an error, never panic.

use flywheel_eval::spec::EvalSpec;
use flywheel_runtime::testing::{mutations, no_panic};

#[test]
fn mutated_specs_never_panic() {
    let specs = [
        include_str!("../../../evals/sql-ladder.toml"),
        include_str!("../../../evals/python-faq-rag.toml"),
    ];
    let mut refused = 0;
    for (s, text) in specs.iter().enumerate() {
        assert!(
            EvalSpec::parse(text, "shipped.toml").is_ok(),
            "spec {s} parses as shipped"
        );
        for (i, m) in mutations(text.as_bytes(), 300, 0, s as u64)
            .into_iter()
            .enumerate()
        {
            let t = String::from_utf8_lossy(&m);
            match no_panic(&format!("spec {s} case {i}"), || {
                EvalSpec::parse(&t, "fuzz.toml")
            }) {
                Ok(r) => refused += r.is_err() as usize,
                Err(p) => panic!("{p}: {t:?}"),
            }
        }
    }
    assert!(refused > 0, "some mutations must be refused");
}

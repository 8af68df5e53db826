//! Server metrics in the Prometheus text format: requests by endpoint, model and status;
//! prompt and generated tokens per model (base or adapter); latency and time-to-first-token
//! histograms per model; queue depth and running batch size.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    latency: BTreeMap<String, Histogram>,
    ttft: BTreeMap<String, Histogram>,
}

/// Counters and histograms, updated by the handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one finished request.
    pub fn request(&self, endpoint: &str, model: &str, status: u16) {
        let mut g = self.inner.lock().expect("poisoned");
        *g.requests
            .entry((endpoint.to_string(), model.to_string(), status))
            .or_default() += 1;
    }

    /// Records a generation's token counts and timings (`ttft` when a token came).
    pub fn generation(
        &self,
        model: &str,
        prompt: usize,
        completion: usize,
        latency_s: f64,
        ttft_s: Option<f64>,
    ) {
        let mut g = self.inner.lock().expect("poisoned");
        *g.prompt_tokens.entry(model.to_string()).or_default() += prompt as u64;
        *g.completion_tokens.entry(model.to_string()).or_default() += completion as u64;
        g.latency
            .entry(model.to_string())
            .or_default()
            .observe(latency_s);
        if let Some(t) = ttft_s {
            g.ttft.entry(model.to_string()).or_default().observe(t);
        }
    }

    /// The Prometheus text exposition, with the engine's gauges.
    pub fn render(
        &self,
        queue_depth: usize,
        active: usize,
        adapters: usize,
        reused: usize,
    ) -> String {
        let g = self.inner.lock().expect("poisoned");
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP flywheel_requests_total Requests handled, by endpoint, model and HTTP status."
        );
        let _ = writeln!(s, "# TYPE flywheel_requests_total counter");
        for ((e, m, st), n) in &g.requests {
            let _ = writeln!(
                s,
                "flywheel_requests_total{{endpoint=\"{}\",model=\"{}\",status=\"{st}\"}} {n}",
                label(e),
                label(m)
            );
        }
        for (name, help, map) in [
            (
                "flywheel_prompt_tokens_total",
                "Prompt tokens processed, by model.",
                &g.prompt_tokens,
            ),
            (
                "flywheel_completion_tokens_total",
                "Tokens generated, by model.",
                &g.completion_tokens,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            for (m, n) in map {
                let _ = writeln!(s, "{name}{{model=\"{}\"}} {n}", label(m));
            }
        }
        for (name, help, map) in [
            (
                "flywheel_request_duration_seconds",
                "Generation request latency, by model.",
                &g.latency,
            ),
            (
                "flywheel_time_to_first_token_seconds",
                "Time to the first generated token, by model.",
                &g.ttft,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} histogram");
            for (m, h) in map {
                let m = label(m);
                for (b, c) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(s, "{name}_bucket{{model=\"{m}\",le=\"{b}\"}} {c}");
                }
                let _ = writeln!(s, "{name}_bucket{{model=\"{m}\",le=\"+Inf\"}} {}", h.n);
                let _ = writeln!(s, "{name}_sum{{model=\"{m}\"}} {}", h.sum);
                let _ = writeln!(s, "{name}_count{{model=\"{m}\"}} {}", h.n);
            }
        }
        let _ = writeln!(
            s,
            "# HELP flywheel_prefix_cache_tokens_total Prompt tokens taken from the prefix cache."
        );
        let _ = writeln!(s, "# TYPE flywheel_prefix_cache_tokens_total counter");
        let _ = writeln!(s, "flywheel_prefix_cache_tokens_total {reused}");
        for (name, help, v) in [
            (
                "flywheel_queue_depth",
                "Requests waiting for a batch slot.",
                queue_depth,
            ),
            (
                "flywheel_batch_size",
                "Sequences in the running batch.",
                active,
            ),
            ("flywheel_adapters_loaded", "Adapters loaded.", adapters),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} gauge");
            let _ = writeln!(s, "{name} {v}");
        }
        s
    }
}

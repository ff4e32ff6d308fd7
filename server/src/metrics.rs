//! Prometheus metrics in the text exposition format (hand-written: a few counters, gauges and
//! histograms do not need a metrics crate).

use crate::http::{Body, Fields};
use crate::State;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency and time-to-first-token buckets: from a cached tiny
/// model's milliseconds to a long generation's minutes.
const BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Default, Clone)]
struct Histogram {
    /// Per bucket (not cumulative), plus +Inf last.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    ttft: Mutex<Histogram>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Engine calls running now (generations and embeddings).
    pub active: AtomicUsize,
}

impl Metrics {
    /// A finished request (its response body written or dropped).
    pub fn request(&self, route: &'static str, status: u16, secs: f64) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
        lock(&self.latency).entry(route).or_default().observe(secs);
    }

    pub fn first_token(&self, secs: f64) {
        lock(&self.ttft).observe(secs);
    }

    pub fn tokens(&self, f: &Fields) {
        let p = f.prompt_tokens.unwrap_or(0) as u64;
        let g = f.completion_tokens.unwrap_or(0) as u64;
        self.prompt_tokens.fetch_add(p, Ordering::Relaxed);
        self.generated_tokens.fetch_add(g, Ordering::Relaxed);
    }

    pub fn render(&self, state: &State) -> Response<Body> {
        let mut o = String::new();
        o.push_str("# HELP spinfer_http_requests_total Requests answered, by route and status.\n");
        o.push_str("# TYPE spinfer_http_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                o,
                "spinfer_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        o.push_str("# HELP spinfer_http_request_duration_seconds Time from request to the end of its response body.\n");
        o.push_str("# TYPE spinfer_http_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.render(
                &mut o,
                "spinfer_http_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        o.push_str("# HELP spinfer_time_to_first_token_seconds Time from request to the first generated text.\n");
        o.push_str("# TYPE spinfer_time_to_first_token_seconds histogram\n");
        lock(&self.ttft).render(&mut o, "spinfer_time_to_first_token_seconds", "");
        let counters = [
            (
                "spinfer_prompt_tokens_total",
                "Prompt tokens processed (generation and embeddings).",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "spinfer_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        // The server's own queue and calls, and the batching engine's view beneath them.
        let engine = state.engine.stats();
        let gauges = [
            (
                "spinfer_queue_depth",
                "Requests waiting: for a server slot, or in the engine's queue.",
                state.queued.load(Ordering::SeqCst) + engine.queued,
            ),
            (
                "spinfer_active_sequences",
                "Engine calls (generations, embeddings) running now.",
                self.active.load(Ordering::SeqCst),
            ),
            (
                "spinfer_engine_queued",
                "Requests in the engine's queue (waiting for a batch slot or KV memory).",
                engine.queued,
            ),
            (
                "spinfer_engine_active_sequences",
                "Sequences the engine is prefilling or decoding.",
                engine.active,
            ),
            (
                "spinfer_kv_bytes_used",
                "KV-cache bytes held by sequences in flight and the prefix cache.",
                engine.kv_bytes_used,
            ),
            (
                "spinfer_kv_budget_bytes",
                "The engine's KV-cache byte budget.",
                engine.kv_budget_bytes,
            ),
            (
                "spinfer_ready",
                "1 when the configured models are loaded.",
                state.ready.load(Ordering::SeqCst) as usize,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let mut r = Response::new(Body::full(o));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

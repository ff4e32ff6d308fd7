//! The server's own overhead: N concurrent clients streaming completions through HTTP
//! (`POST /v1/completions`, `stream: true`, SSE parsed by the client) against the same load on
//! the library directly (N threads calling `Engine::generate`), in one process, same model,
//! same greedy requests. Prints requests/s and generated tokens/s for both and the difference.
//!
//!   cargo bench -p spinfer-server --bench http -- [--registry DIR] [--model NAME]
//!       [--clients N] [--requests R] [--max-tokens T] [--rounds K]
//!
//! Defaults: fixtures/real/registry, smollm2-135m-instruct (fixtures/fetch-smollm2.sh), 8
//! clients, 4 requests each, 32 tokens, 2 rounds (direct and HTTP alternate so that drift in
//! the machine's load hits both).

use spinfer::{Engine, GenerateOptions, InferencingParams};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    registry: String,
    model: String,
    clients: usize,
    requests: usize,
    max_tokens: u32,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        registry: concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/real/registry").into(),
        model: "smollm2-135m-instruct".into(),
        clients: 8,
        requests: 4,
        max_tokens: 32,
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut v = || it.next().expect("a value after the flag");
        match f.as_str() {
            "--registry" => a.registry = v(),
            "--model" => a.model = v(),
            "--clients" => a.clients = v().parse().unwrap(),
            "--requests" => a.requests = v().parse().unwrap(),
            "--max-tokens" => a.max_tokens = v().parse().unwrap(),
            "--rounds" => a.rounds = v().parse().unwrap(),
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Distinct prompts so that requests are not identical (the same set in both modes).
/// Story openings, so that greedy generation runs to `max_tokens` rather than stopping at an
/// early end of sequence.
fn prompt(client: usize, i: usize) -> String {
    const WHO: [&str; 8] = [
        "fox", "robot", "king", "baker", "dragon", "sailor", "cat", "witch",
    ];
    format!(
        "Once upon a time, in a village by the sea, there lived a {} called number {}. Every morning,",
        WHO[client % WHO.len()],
        client * 10 + i
    )
}

fn params(max_tokens: u32) -> GenerateOptions {
    GenerateOptions {
        params: InferencingParams {
            max_tokens,
            repeat_penalty: 1.0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        },
        seed: Some(0),
        ..Default::default()
    }
}

/// (requests, generated tokens, seconds)
fn direct(engine: &Arc<Engine>, a: &Args) -> (usize, u64, f64) {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..a.clients)
        .map(|c| {
            let (engine, model, req, max) = (
                Arc::clone(engine),
                a.model.clone(),
                a.requests,
                a.max_tokens,
            );
            std::thread::spawn(move || {
                let mut tokens = 0u64;
                for i in 0..req {
                    let g = engine
                        .generate(&model, &prompt(c, i), &params(max), &mut |_| {
                            ControlFlow::Continue(())
                        })
                        .unwrap();
                    tokens += g.usage.generated_token_count as u64;
                }
                tokens
            })
        })
        .collect();
    let tokens = handles.into_iter().map(|h| h.join().unwrap()).sum();
    (a.clients * a.requests, tokens, t0.elapsed().as_secs_f64())
}

/// One streamed completion over a raw socket; returns the generated-token count from the
/// usage chunk.
fn http_one(addr: SocketAddr, model: &str, prompt: &str, max_tokens: u32) -> u64 {
    let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "top_k": 0, "seed": 0, "stream": true,
        "stream_options": {"include_usage": true}})
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut all = String::new();
    r.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    // The usage chunk: the last `"completion_tokens":N` in the stream.
    let i = all.rfind("\"completion_tokens\":").expect("a usage chunk");
    let n: String = all[i + 20..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    n.parse().unwrap()
}

fn http(addr: SocketAddr, a: &Args) -> (usize, u64, f64) {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..a.clients)
        .map(|c| {
            let (model, req, max) = (a.model.clone(), a.requests, a.max_tokens);
            std::thread::spawn(move || {
                (0..req)
                    .map(|i| http_one(addr, &model, &prompt(c, i), max))
                    .sum::<u64>()
            })
        })
        .collect();
    let tokens = handles.into_iter().map(|h| h.join().unwrap()).sum();
    (a.clients * a.requests, tokens, t0.elapsed().as_secs_f64())
}

fn main() {
    let a = args();
    let mut cfg = spinfer_server::Config::new(&a.registry);
    cfg.max_active = a.clients;
    cfg.max_queue = a.clients * 4;
    cfg.preload = vec![a.model.clone()];
    let state = spinfer_server::State::new(cfg);
    let engine = Arc::clone(&state.engine); // the server's own engine: one model in memory
    spinfer_server::load_model(&engine, &a.model).expect("the model loads");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(spinfer_server::serve(
        listener,
        Arc::clone(&state),
        std::future::pending(),
    ));
    // Warm-up: one request each way (page cache, thread pools).
    http_one(addr, &a.model, "warm up", 4);
    engine
        .generate(&a.model, "warm up", &params(4), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();

    println!(
        "model {} | {} clients x {} requests, {} tokens each (greedy) | {} cores",
        a.model,
        a.clients,
        a.requests,
        a.max_tokens,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<8} {:>6} {:>10} {:>9} {:>10}",
        "mode", "round", "requests/s", "tok/s", "seconds"
    );
    let (mut d_tok, mut d_s, mut h_tok, mut h_s) = (0u64, 0.0, 0u64, 0.0);
    for round in 0..a.rounds {
        for mode in ["direct", "http"] {
            let (n, tok, secs) = if mode == "direct" {
                direct(&engine, &a)
            } else {
                http(addr, &a)
            };
            println!(
                "{mode:<8} {round:>6} {:>10.2} {:>9.1} {secs:>10.2} {:>11.1}",
                n as f64 / secs,
                tok as f64 / secs,
                tok as f64 / n as f64
            );
            if mode == "direct" {
                (d_tok, d_s) = (d_tok + tok, d_s + secs);
            } else {
                (h_tok, h_s) = (h_tok + tok, h_s + secs);
            }
        }
    }
    let (d, h) = (d_tok as f64 / d_s, h_tok as f64 / h_s);
    println!(
        "all rounds: direct {d:.1} tok/s, http {h:.1} tok/s: HTTP overhead {:+.1}% of throughput",
        (d - h) / d * 100.0
    );
}

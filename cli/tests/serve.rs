//! `spinfer serve` end to end on the fixture models (tiny-llama, tiny-bert): Spin's `default`
//! requests replayed byte for byte as contract §6 gives them, the OpenAI endpoints over raw
//! HTTP, bad input, concurrent streams, access control, SIGTERM (a client that goes away:
//! serve_real.rs, on a model whose context is long enough to need cancelling).
//! Expected texts and vectors come from the library's own direct calls (greedy), which the
//! library tests check against transformers / llama.cpp.

mod serve_common;

use serde_json::{json, Value};
use serve_common::*;
use spinfer::{Engine, GenerateOptions, InferencingParams};
use std::io::{BufReader, Write};

const TOKEN: &str = "s3cret-token";
const LIMITED: &str = "limited-token";

fn registry() -> std::path::PathBuf {
    root().join("fixtures/registry")
}

/// A token file: one token for every model, one limited to tiny-bert.
fn token_file() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("spinfer-serve-tokens-{}", std::process::id()));
    std::fs::write(&p, format!("# test tokens\n{TOKEN}\n{LIMITED} tiny-bert\n")).unwrap();
    p
}

fn start() -> Server {
    let tf = token_file();
    Server::start(
        &[
            "--registry",
            registry().to_str().unwrap(),
            "--auth-token-file",
            tf.to_str().unwrap(),
            "--models",
            "tiny-llama,tiny-bert",
            "--max-body-bytes",
            "65536",
        ],
        &[],
    )
}

fn greedy(max_tokens: u32, repeat_penalty: f32) -> InferencingParams {
    InferencingParams {
        max_tokens,
        repeat_penalty,
        temperature: 0.0,
        ..Default::default()
    }
}

/// Spin's request exactly as its client sends it (contract §6): lowercase `bearer`, a W3C
/// traceparent, `accept: */*`, `accept-encoding: gzip`, no content-type.
fn spin_request(addr: std::net::SocketAddr, path: &str, token: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nauthorization: bearer {token}\r\n\
         traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
         accept: */*\r\naccept-encoding: gzip\r\nhost: {addr}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn spin_default_protocol_byte_for_byte() {
    let s = start();
    let engine = Engine::new(registry());
    // /infer with every option, greedy so the text is determined.
    let body = r#"{"model":"tiny-llama","prompt":"Once upon a time","options":{"maxTokens":12,"repeatPenalty":1.1,"repeatPenaltyLastNTokenCount":64,"temperature":0.0,"topK":40,"topP":0.9}}"#;
    let r = send_raw(s.addr, &spin_request(s.addr, "/infer", TOKEN, body));
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = engine
        .infer_with_options("tiny-llama", "Once upon a time", greedy(12, 1.1))
        .unwrap();
    assert_eq!(
        r.json(),
        json!({"text": expected.text, "usage": {
            "promptTokenCount": expected.usage.prompt_token_count,
            "generatedTokenCount": expected.usage.generated_token_count}})
    );
    // Spin's defaults (sampled): the shape and the token budget.
    let body = r#"{"model":"tiny-llama","prompt":"Hello","options":{"maxTokens":100,"repeatPenalty":1.1,"repeatPenaltyLastNTokenCount":64,"temperature":0.8,"topK":40,"topP":0.9}}"#;
    let v = send_raw(s.addr, &spin_request(s.addr, "/infer", TOKEN, body)).json();
    assert!(v["text"].is_string());
    assert!(v["usage"]["generatedTokenCount"].as_u64().unwrap() <= 100);

    // /embed.
    let body = r#"{"model":"tiny-bert","input":["hello world","a second sentence"]}"#;
    let r = send_raw(s.addr, &spin_request(s.addr, "/embed", TOKEN, body));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = engine
        .generate_embeddings("tiny-bert", &["hello world", "a second sentence"])
        .unwrap();
    let v = r.json();
    let got: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(got, e.embeddings, "f32 values survive JSON exactly");
    assert_eq!(
        v["usage"]["promptTokenCount"],
        json!(e.usage.prompt_token_count)
    );

    // Errors: a non-2xx status and a body naming the Spin variant.
    let body = r#"{"model":"no-such-model","prompt":"x"}"#;
    let r = send_raw(s.addr, &spin_request(s.addr, "/infer", TOKEN, body));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["variant"], "invalid-input");
    assert_eq!(
        r.json()["error"]["message"],
        "no model directory found in registry for model 'no-such-model'"
    );
    let body = r#"{"model":"tiny-bert","input":["x"]}"#;
    let r = send_raw(s.addr, &spin_request(s.addr, "/embed", LIMITED, body));
    assert_eq!(r.status, 200, "the limited token may use tiny-bert");
    let body = r#"{"model":"tiny-llama","prompt":"x"}"#;
    let r = send_raw(s.addr, &spin_request(s.addr, "/infer", LIMITED, body));
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["error"]["message"],
        "The component does not have access to use 'tiny-llama'. To give the component access, \
         add 'tiny-llama' to the 'ai_models' key for the component in your spin.toml manifest"
    );
    // The access log: one JSON line per request (written once the response is sent).
    s.wait_log(|l| l["path"] == "/infer" && l["status"] == 403 && l["model"] == "tiny-llama");
}

#[test]
fn bad_input_gets_the_right_status_and_the_server_goes_on() {
    let s = start();
    let a = s.addr;
    let post = |path: &str, token: Option<&str>, body: &str| request(a, "POST", path, token, body);
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("/infer", Some(TOKEN), "{not json".into(), 400),
        (
            "/infer",
            Some(TOKEN),
            r#"{"model":"tiny-llama","prompt":7}"#.into(),
            400,
        ),
        (
            "/infer",
            Some(TOKEN),
            r#"{"model":"tiny-llama","prompt":"x","options":{"maxTokens":"9"}}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            Some(TOKEN),
            r#"{"model":"tiny-llama","messages":"hi"}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            Some(TOKEN),
            r#"{"model":"tiny-llama","prompt":"x","temperature":"hot"}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            Some(TOKEN),
            r#"{"model":"tiny-llama","prompt":"x","n":2}"#.into(),
            400,
        ),
        (
            "/v1/embeddings",
            Some(TOKEN),
            r#"{"model":"tiny-bert","input":[[1,2]]}"#.into(),
            400,
        ),
        (
            "/infer",
            None,
            r#"{"model":"tiny-llama","prompt":"x"}"#.into(),
            401,
        ),
        (
            "/infer",
            Some("wrong"),
            r#"{"model":"tiny-llama","prompt":"x"}"#.into(),
            401,
        ),
        (
            "/v1/completions",
            Some(TOKEN),
            r#"{"model":"nope","prompt":"x"}"#.into(),
            404,
        ),
        (
            "/v1/completions",
            Some(TOKEN),
            r#"{"model":"../llama/tiny-llama","prompt":"x"}"#.into(),
            400,
        ),
        (
            "/embed",
            Some(TOKEN),
            r#"{"model":"..","input":["x"]}"#.into(),
            400,
        ),
        (
            "/v1/embeddings",
            Some(TOKEN),
            r#"{"model":"tiny-llama","input":"x"}"#.into(),
            400,
        ),
        (
            "/infer",
            Some(TOKEN),
            format!(
                r#"{{"model":"tiny-llama","prompt":"{}"}}"#,
                "x".repeat(70_000)
            ),
            413,
        ),
        ("/nowhere", Some(TOKEN), "{}".into(), 404),
    ];
    for (path, token, body, status) in &cases {
        let r = post(path, *token, body);
        assert_eq!(r.status, *status, "{path} {body:.80}: {}", r.text());
        let v = r.json();
        if path.starts_with("/v1/") {
            assert!(
                v["error"]["message"].is_string() && v["error"]["type"].is_string(),
                "{v}"
            );
        } else {
            assert!(
                v["error"]["variant"].is_string() && v["error"]["message"].is_string(),
                "{v}"
            );
        }
        // Still serving.
        assert_eq!(request(a, "GET", "/health", None, "").status, 200);
    }
    // The path-escaping name is refused by name, before any file is touched.
    let r = post(
        "/v1/completions",
        Some(TOKEN),
        r#"{"model":"../llama/tiny-llama","prompt":"x"}"#,
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("path separator"));
    // A huge body with a lying (absent) length: chunked, cut at the limit.
    let mut raw = format!(
        "POST /infer HTTP/1.1\r\nhost: {a}\r\nauthorization: bearer {TOKEN}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        raw.extend(format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192)).bytes());
    }
    raw.extend(b"0\r\n\r\n");
    assert_eq!(send_raw(a, &raw).status, 413);
    // After all that, a real request works.
    let r = post(
        "/v1/completions",
        Some(TOKEN),
        r#"{"model":"tiny-llama","prompt":"Once upon a time","max_tokens":4,"temperature":0}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let m = request(a, "GET", "/metrics", None, "").text();
    assert!(
        m.contains("spinfer_http_requests_total{route=\"/infer\",status=\"413\"} 2"),
        "{m}"
    );
}

/// The library's greedy completion of `prompt` with OpenAI's defaults (no repeat penalty).
fn library_completion(engine: &Engine, prompt: &str, max_tokens: u32) -> String {
    let o = GenerateOptions {
        params: InferencingParams {
            top_k: 0,
            top_p: 1.0,
            ..greedy(max_tokens, 1.0)
        },
        seed: Some(0),
        ..Default::default()
    };
    engine
        .generate("tiny-llama", prompt, &o, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
        .text
}

#[test]
fn openai_completions_stop_strings_and_concurrent_streams() {
    let s = start();
    let a = s.addr;
    let engine = Engine::new(registry());
    let prompts = [
        "Once upon a time",
        "The little dog",
        "In a faraway land",
        "She opened the door",
        "It was raining",
        "Tom and Sue",
    ];
    // Non-streamed, with usage and finish_reason.
    let want = library_completion(&engine, prompts[0], 20);
    let body =
        json!({"model": "tiny-llama", "prompt": prompts[0], "max_tokens": 20, "temperature": 0});
    let r = request(a, "POST", "/v1/completions", Some(TOKEN), &body.to_string());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 20);

    // A stop string from inside the expected text: cut before it, finish "stop", also when
    // streamed (the stop string may be split over fragments and must never be sent).
    let chars: Vec<char> = want.chars().collect();
    assert!(
        chars.len() > 8,
        "{want:?} is long enough to hold a stop string"
    );
    {
        let stop: String = chars[4..7].iter().collect();
        let cut = &want[..want.find(&stop).unwrap()];
        let body = json!({"model": "tiny-llama", "prompt": prompts[0], "max_tokens": 20,
                          "temperature": 0, "stop": [stop.clone()]});
        let v = request(a, "POST", "/v1/completions", Some(TOKEN), &body.to_string()).json();
        assert_eq!(v["choices"][0]["text"], cut, "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let mut b = body.clone();
        b["stream"] = json!(true);
        let r = request(a, "POST", "/v1/completions", Some(TOKEN), &b.to_string());
        assert!(!r.text().contains(&stop));
        assert_eq!(streamed_text(&r.text()), (cut.to_string(), "stop".into()));
    }

    // Concurrent streams, each with its own prompt: every text complete and its own. More
    // streams than --max-active's default would also queue; six is enough to interleave.
    let wants: Vec<String> = prompts
        .iter()
        .map(|p| library_completion(&engine, p, 24))
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let body = json!({"model": "tiny-llama", "prompt": p, "max_tokens": 24,
                              "temperature": 0, "stream": true,
                              "stream_options": {"include_usage": true}});
            std::thread::spawn(move || {
                request(a, "POST", "/v1/completions", Some(TOKEN), &body.to_string())
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&wants) {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let body = r.text();
        assert_eq!(streamed_text(&body), (want.clone(), "length".into()));
        let ev = sse_events(&body);
        let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 24, "{body}");
        assert_eq!(usage["choices"], json!([]));
    }
    wait_metric(a, "spinfer_active_sequences 0");
    let m = request(a, "GET", "/metrics", None, "").text();
    assert!(
        m.contains("spinfer_time_to_first_token_seconds_count "),
        "{m}"
    );
    assert!(m.contains("spinfer_generated_tokens_total "), "{m}");
}

#[test]
fn models_health_ready_and_unauthenticated_loopback_only() {
    let s = start();
    let a = s.addr;
    assert_eq!(request(a, "GET", "/ready", None, "").status, 200);
    let v = request(a, "GET", "/v1/models", Some(TOKEN), "").json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"tiny-llama") && ids.contains(&"tiny-bert"),
        "{ids:?}"
    );
    let v = request(a, "GET", "/v1/models", Some(LIMITED), "").json();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(request(a, "GET", "/v1/models", None, "").status, 401);

    // No token: refused on a public address, served (and said so) on loopback.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spinfer"))
        .args(["serve", "--listen", "0.0.0.0:0", "--registry"])
        .arg(registry())
        .env_remove("SPINFER_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no auth token configured"));
    let open = Server::start(&["--registry", registry().to_str().unwrap()], &[]);
    assert!(open.log_lines()[0].contains("no auth token configured"));
    let r = request(
        open.addr,
        "POST",
        "/infer",
        None,
        r#"{"model":"tiny-llama","prompt":"x","options":{"maxTokens":1}}"#,
    );
    assert_eq!(r.status, 200);
    // The environment variable's token.
    let env = Server::start(
        &["--registry", registry().to_str().unwrap()],
        &[("SPINFER_AUTH_TOKEN", "envtok")],
    );
    assert_eq!(request(env.addr, "GET", "/v1/models", None, "").status, 401);
    assert_eq!(
        request(env.addr, "GET", "/v1/models", Some("envtok"), "").status,
        200
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let mut s = start();
    let a = s.addr;
    let body = json!({"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 200,
                      "temperature": 0, "stream": true});
    let mut c = connect(a);
    c.write_all(&raw_request(
        a,
        "POST",
        "/v1/completions",
        Some(TOKEN),
        &body.to_string(),
    ))
    .unwrap();
    let mut r = BufReader::new(c);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    s.sigterm();
    // The stream in flight still completes.
    let mut body = Vec::new();
    while let Some(chunk) = read_chunk(&mut r) {
        body.extend(chunk);
    }
    let (_, finish) = streamed_text(&String::from_utf8(body).unwrap());
    assert!(finish == "length" || finish == "stop");
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(a).is_err(),
        "no longer accepting"
    );
}

//! `spinfer serve` with the real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2; the README's
//! test command fetches them) and the real `openai` Python client (fixtures/setup-openai-venv.sh,
//! in the same command): chat through SmolLM2's ChatML template, streaming chat with usage,
//! completions, embeddings (base64 and float) and an error, each checked against the library's
//! own greedy results. Also a client that goes away mid-stream on a model whose context is long
//! enough that only cancellation can end the generation early.
//!
//! Spawns the CLI (`CARGO_BIN_EXE_spinfer`, through serve_common), so .ci/cross.sh leaves it to
//! native runs.

mod serve_common;

use serde_json::{json, Value};
use serve_common::*;
use spinfer::{ChatMessage, Engine, GenerateOptions, InferencingParams};
use std::io::{BufReader, Write};
use std::process::Command;

const CHAT: &str = "smollm2-135m-instruct";
const EMBED: &str = "all-minilm-l6-v2";
const TOKEN: &str = "real-token";

fn registry() -> std::path::PathBuf {
    root().join("fixtures/real/registry")
}

fn require_real_models() {
    for p in [format!("llama/{CHAT}"), EMBED.to_string()] {
        assert!(
            registry().join(&p).is_dir(),
            "fixtures/real/registry/{p} is missing: run fixtures/fetch-smollm2.sh and \
             fixtures/fetch-minilm.sh (the README's test command does)"
        );
    }
}

fn start() -> Server {
    Server::start(
        &[
            "--registry",
            registry().to_str().unwrap(),
            "--models",
            &format!("{CHAT},{EMBED}"),
        ],
        &[("SPINFER_AUTH_TOKEN", TOKEN)],
    )
}

/// The library's greedy text with OpenAI's defaults as the server maps them (no repeat
/// penalty, no top-k, top-p 1).
fn library(engine: &Engine, prompt: &str, max_tokens: u32) -> (String, u32, u32) {
    let o = GenerateOptions {
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
    };
    let g = engine
        .generate(CHAT, prompt, &o, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    (
        g.text,
        g.usage.prompt_token_count,
        g.usage.generated_token_count,
    )
}

#[test]
fn openai_python_client_against_the_library() {
    require_real_models();
    let py = root().join("fixtures/.venv-openai/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run fixtures/setup-openai-venv.sh (the README's test command does)",
        py.display()
    );
    let s = start();
    let out = Command::new(&py)
        .arg(root().join("fixtures/openai_client.py"))
        .arg(format!("http://{}/v1", s.addr))
        .args([TOKEN, CHAT, EMBED])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai_client.py failed: {}\nserver log: {:?}",
        String::from_utf8_lossy(&out.stderr),
        s.log_lines()
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("openai client {}", got["openai_version"]);

    let engine = Engine::new(registry());
    let prompt = engine
        .chat_prompt(
            CHAT,
            &[ChatMessage::new("user", "What is the capital of France?")],
        )
        .unwrap();
    let (text, p, c) = library(&engine, &prompt, 24);
    let finish = if c < 24 { "stop" } else { "length" };
    assert_eq!(
        got["chat"],
        json!({"content": text, "finish_reason": finish, "prompt_tokens": p, "completion_tokens": c})
    );
    assert_eq!(got["chat_stream"]["content"], text.as_str());
    assert_eq!(got["chat_stream"]["finish_reason"], finish);
    assert_eq!(
        got["chat_stream"]["usage"],
        json!({"prompt_tokens": p, "completion_tokens": c})
    );
    assert!(
        got["chat_stream"]["chunks"].as_u64().unwrap() >= 3,
        "streamed in pieces"
    );

    let (text, _, c) = library(&engine, "The capital of France is", 8);
    assert_eq!(got["completion"]["text"], text.as_str());
    assert_eq!(got["completion"]["completion_tokens"], c);

    let inputs = ["The cat sits outside", "A man is playing guitar"];
    let e = engine.generate_embeddings(EMBED, &inputs).unwrap();
    let b64: Vec<Vec<f32>> = serde_json::from_value(got["embeddings_base64"].clone()).unwrap();
    assert_eq!(
        b64, e.embeddings,
        "base64 little-endian f32, decoded by the client, exact"
    );
    let e1 = engine.generate_embeddings(EMBED, &inputs[..1]).unwrap();
    let float: Vec<Vec<f32>> = serde_json::from_value(got["embeddings_float"].clone()).unwrap();
    assert_eq!(float, e1.embeddings);
    assert_eq!(got["embeddings_prompt_tokens"], e1.usage.prompt_token_count);

    assert_eq!(got["error"]["class"], "NotFoundError");
    assert_eq!(got["error"]["status"], 404);
    assert_eq!(got["error"]["body"]["code"], "model_not_found");
    assert_eq!(got["models"], json!([EMBED, CHAT]));
}

#[test]
fn a_client_that_goes_away_cancels_its_generation() {
    require_real_models();
    let s = start();
    let a = s.addr;
    // Sampled, with no token limit: only the client going away (or SmolLM2's 8k context,
    // minutes away on this machine) ends it.
    let body = json!({"model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
                      "temperature": 1.0, "stream": true});
    let mut c = connect(a);
    c.write_all(&raw_request(
        a,
        "POST",
        "/v1/chat/completions",
        Some(TOKEN),
        &body.to_string(),
    ))
    .unwrap();
    let mut r = BufReader::new(c);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    for _ in 0..3 {
        assert!(read_chunk(&mut r).is_some(), "streamed events");
    }
    drop(r); // the client goes away mid-stream
    let line = s.wait_log(|v| v["path"] == "/v1/chat/completions");
    assert_eq!(line["finish"], "client-gone", "{line}");
    wait_metric(a, "spinfer_active_sequences 0");
    // Not streamed: the client closes its connection while it waits for the answer.
    let body = json!({"model": CHAT, "prompt": "Tell me a long story.", "temperature": 1.0,
                      "max_tokens": 100000});
    // Sampled text can end on its own (an end-of-sequence token) in the moment between the
    // check that it runs and the server seeing the client leave: then the line says "stop"
    // and the attempt proves nothing, so try again.
    let mut line = json!(null);
    for attempt in 0..5 {
        let mut c = connect(a);
        c.write_all(&raw_request(
            a,
            "POST",
            "/v1/completions",
            Some(TOKEN),
            &body.to_string(),
        ))
        .unwrap();
        wait_metric(a, "spinfer_active_sequences 1");
        drop(c);
        line = s.wait_log_nth(attempt, |v| v["path"] == "/v1/completions");
        wait_metric(a, "spinfer_active_sequences 0");
        if line["finish"] != "stop" {
            break;
        }
    }
    assert_eq!(line["finish"], "client-gone", "{line}");
    assert_eq!(line["status"], 499, "{line}");
    wait_metric(a, "spinfer_active_sequences 0");
    // And the server goes on.
    let r = request(
        a,
        "POST",
        "/v1/completions",
        Some(TOKEN),
        &json!({"model": CHAT, "prompt": "Hi", "max_tokens": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Spin's `api_type = "open_ai"` requests, byte for byte as contract §6 gives them (JSON with a
/// content-type; no temperature, so the chat is sampled and only its shape is checked).
#[test]
fn spin_open_ai_requests_byte_for_byte() {
    require_real_models();
    let s = start();
    let a = s.addr;
    let raw = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nauthorization: bearer {TOKEN}\r\n\
             content-type: application/json\r\naccept: */*\r\naccept-encoding: gzip\r\n\
             host: {a}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"Say hello."}}],"model":"{CHAT}","max_completion_tokens":16,"frequency_penalty":1.1}}"#
    );
    let r = send_raw(a, &raw("/v1/chat/completions", &body));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let body = format!(r#"{{"input":["The cat sits outside"],"model":"{EMBED}"}}"#);
    let r = send_raw(a, &raw("/v1/embeddings", &body));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = Engine::new(registry())
        .generate_embeddings(EMBED, &["The cat sits outside"])
        .unwrap();
    let got: Vec<f32> = serde_json::from_value(r.json()["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(got, e.embeddings[0]);
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        e.usage.prompt_token_count
    );
}

/// A full queue answers 503 with Retry-After; a generation past --request-timeout answers 504;
/// the server serves on after both.
#[test]
fn queue_limit_and_request_timeout() {
    require_real_models();
    let s = Server::start(
        &[
            "--registry",
            registry().to_str().unwrap(),
            "--models",
            CHAT,
            "--max-active",
            "1",
            "--max-queue",
            "0",
            "--request-timeout",
            "2",
        ],
        &[("SPINFER_AUTH_TOKEN", TOKEN)],
    );
    let a = s.addr;
    // Greedy, so the story's length does not change between runs (hundreds of tokens, seconds
    // on a 2-core Zen 3). Sampled at temperature 1 it sometimes ended before the timeout and
    // the test failed by chance.
    let long = json!({"model": CHAT, "prompt": "Once upon a time", "max_tokens": 100000,
                      "temperature": 0.0, "stream": true});
    let mut c = connect(a);
    c.write_all(&raw_request(
        a,
        "POST",
        "/v1/completions",
        Some(TOKEN),
        &long.to_string(),
    ))
    .unwrap();
    let mut held = BufReader::new(c);
    assert_eq!(read_head(&mut held).0, 200);
    // The one slot is taken and no one may wait: refused at once.
    let r = request(
        a,
        "POST",
        "/infer",
        Some(TOKEN),
        &format!(r#"{{"model":"{CHAT}","prompt":"x"}}"#),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    // The held stream ends by the 1 s timeout with an error event, then [DONE].
    let mut body = Vec::new();
    while let Some(chunk) = read_chunk(&mut held) {
        body.extend(chunk);
    }
    let body = String::from_utf8(body).unwrap();
    let ev = sse_events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    assert!(ev[ev.len() - 2].contains("\"timeout\""), "{body:.300}");
    // Not streamed: 504.
    let mut nostream = long.clone();
    nostream["stream"] = json!(false);
    let r = request(
        a,
        "POST",
        "/v1/completions",
        Some(TOKEN),
        &nostream.to_string(),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "timeout");
    let r = request(
        a,
        "POST",
        "/v1/completions",
        Some(TOKEN),
        &json!({"model": CHAT, "prompt": "Hi", "max_tokens": 2}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

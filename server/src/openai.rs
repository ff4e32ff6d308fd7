//! The OpenAI API (and Spin's `api_type = "open_ai"`): `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, `POST /v1/embeddings`. Errors in OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Sampling follows OpenAI's defaults (temperature 1, top_p 1, no top-k, no repeat penalty),
//! with `top_k`, `repeat_penalty` and `repeat_last_n` accepted as llama.cpp's server accepts
//! them. `max_tokens` (or `max_completion_tokens`) absent: 16 for completions (OpenAI's
//! default), until end of sequence or a full context for chat.

use crate::auth::{check_model, Allowed};
use crate::generation::{self, CancelOnDrop, Event, Finish, Outcome, Prompt};
use crate::http::{self, Body, Failure, RequestLog};
use crate::State;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use spinfer::{ChatMessage, GenerateOptions, InferencingParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Sampling fields shared by both generation endpoints.
#[derive(Deserialize, Default)]
struct Sampling {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// llama.cpp extensions.
    top_k: Option<u32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<u32>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Sampling {
    fn options(&self, default_max: u32) -> Result<(GenerateOptions, Vec<String>), Failure> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(Failure::bad_request("only n = 1 is supported"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Failure::bad_request(format!(
                "temperature {temperature} is outside [0, 2]"
            )));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(Failure::bad_request(format!("{name} must be in [-2, 2]")));
            }
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > 4 {
            return Err(Failure::bad_request("at most 4 stop sequences"));
        }
        let opts = GenerateOptions {
            params: InferencingParams {
                max_tokens: self
                    .max_completion_tokens
                    .or(self.max_tokens)
                    .unwrap_or(default_max),
                repeat_penalty: self.repeat_penalty.unwrap_or(1.0),
                repeat_penalty_last_n_token_count: self.repeat_last_n.unwrap_or(64),
                temperature,
                top_k: self.top_k.unwrap_or(0),
                top_p: self.top_p.unwrap_or(1.0),
            },
            seed: self.seed.map(|s| s as u64),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            cancel: None,
        };
        Ok((opts, stops))
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which the text parts are used.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptField,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id: unique within this process and unlikely to repeat across restarts.
fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{t:x}{:04x}",
        N.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn usage_json(o: &Outcome) -> Value {
    let (p, c) = (o.usage.prompt_token_count, o.usage.generated_token_count);
    json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c })
}

pub async fn chat_completions(
    state: &Arc<State>,
    req: Request<Incoming>,
    allowed: Allowed,
    log: &RequestLog,
) -> Result<Response<Body>, Failure> {
    let r: ChatRequest = http::read_json(state, req).await?;
    log.update(|f| f.model = Some(r.model.clone()));
    check_model(&allowed, &r.model)?;
    let (opts, stops) = r.sampling.options(u32::MAX)?;
    let mut msgs = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(Failure::bad_request(format!(
                            "message content of type '{}' is not supported (text only)",
                            p.kind
                        )));
                    }
                    t.push_str(&p.text.unwrap_or_default());
                }
                t
            }
        };
        msgs.push(ChatMessage::new(m.role, content));
    }
    let id = new_id("chatcmpl");
    let created = now();
    let model = r.model.clone();
    let stream = r.sampling.stream;
    let (rx, guard) =
        generation::start(state, log, r.model, Prompt::Chat(msgs), opts, stops, stream).await?;
    if !stream {
        let o = generation::finish(rx).await?;
        return Ok(http::json(
            StatusCode::OK,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": o.text },
                    "logprobs": null,
                    "finish_reason": o.finish.openai(),
                }],
                "usage": usage_json(&o),
            }),
        ));
    }
    let include_usage = r.sampling.include_usage();
    let base = move |choices: Value, usage: Option<Value>| {
        let mut v = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices,
        });
        if include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v
    };
    let chunk = move |piece: Piece| match piece {
        Piece::Start => base(
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" },
                     "logprobs": null, "finish_reason": null }]),
            None,
        ),
        Piece::Text(t) => base(
            json!([{ "index": 0, "delta": { "content": t }, "logprobs": null,
                     "finish_reason": null }]),
            None,
        ),
        Piece::End(o) => base(
            json!([{ "index": 0, "delta": {}, "logprobs": null,
                     "finish_reason": o.finish.openai() }]),
            None,
        ),
        Piece::Usage(o) => base(json!([]), Some(usage_json(o))),
    };
    sse_response(rx, guard, include_usage, chunk).await
}

pub async fn completions(
    state: &Arc<State>,
    req: Request<Incoming>,
    allowed: Allowed,
    log: &RequestLog,
) -> Result<Response<Body>, Failure> {
    let r: CompletionRequest = http::read_json(state, req).await?;
    log.update(|f| f.model = Some(r.model.clone()));
    check_model(&allowed, &r.model)?;
    let (opts, stops) = r.sampling.options(16)?;
    let prompt = match r.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(Failure::bad_request(
                "only one prompt per request is supported",
            ))
        }
    };
    let id = new_id("cmpl");
    let created = now();
    let model = r.model.clone();
    let stream = r.sampling.stream;
    let (rx, guard) = generation::start(
        state,
        log,
        r.model,
        Prompt::Text(prompt),
        opts,
        stops,
        stream,
    )
    .await?;
    if !stream {
        let o = generation::finish(rx).await?;
        return Ok(http::json(
            StatusCode::OK,
            &json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{
                    "index": 0, "text": o.text, "logprobs": null,
                    "finish_reason": o.finish.openai(),
                }],
                "usage": usage_json(&o),
            }),
        ));
    }
    let include_usage = r.sampling.include_usage();
    let base = move |choices: Value, usage: Option<Value>| {
        let mut v = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices,
        });
        if include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v
    };
    let chunk = move |piece: Piece| match piece {
        Piece::Start => Value::Null,
        Piece::Text(t) => base(
            json!([{ "index": 0, "text": t, "logprobs": null, "finish_reason": null }]),
            None,
        ),
        Piece::End(o) => base(
            json!([{ "index": 0, "text": "", "logprobs": null,
                     "finish_reason": o.finish.openai() }]),
            None,
        ),
        Piece::Usage(o) => base(json!([]), Some(usage_json(o))),
    };
    sse_response(rx, guard, include_usage, chunk).await
}

/// What one server-sent event carries.
enum Piece<'a> {
    /// The opening chunk (chat: the assistant role); `Value::Null` sends nothing.
    Start,
    Text(&'a str),
    End(&'a Outcome),
    Usage(&'a Outcome),
}

/// Waits for the first event (so that an error before any text is a plain HTTP error), then
/// streams the rest as server-sent events ending in `data: [DONE]`.
async fn sse_response(
    mut rx: mpsc::Receiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
    chunk: impl Fn(Piece) -> Value + Send + 'static,
) -> Result<Response<Body>, Failure> {
    let first = rx.recv().await;
    let first = match first {
        Some(Event::Done(Err(f))) => return Err(f),
        Some(ev) => ev,
        None => return Err(Failure::internal("the generation ended without a result")),
    };
    let (tx, body) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        // Dropping `guard` (this task ends, e.g. because the client went away and `tx.send`
        // failed) cancels the generation.
        let _guard = guard;
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                if v.is_null() {
                    return true;
                }
                tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_ok()
            }
        };
        if !send(chunk(Piece::Start)).await {
            return;
        }
        let mut pending = Some(first);
        loop {
            let e = match pending.take() {
                Some(e) => e,
                None => match rx.recv().await {
                    Some(e) => e,
                    None => break,
                },
            };
            match e {
                Event::Text(t) => {
                    if !send(chunk(Piece::Text(&t))).await {
                        return;
                    }
                }
                Event::Done(Ok(o)) if o.finish == Finish::Timeout => {
                    let err = json!({ "error": { "message": "the request timeout passed before the generation finished", "type": "server_error", "param": null, "code": "timeout" } });
                    let _ = send(err).await;
                    break;
                }
                Event::Done(Ok(o)) => {
                    if !send(chunk(Piece::End(&o))).await {
                        return;
                    }
                    if include_usage && !send(chunk(Piece::Usage(&o))).await {
                        return;
                    }
                    break;
                }
                Event::Done(Err(f)) => {
                    let err = json!({ "error": { "message": f.message, "type": f.kind, "param": null, "code": f.code } });
                    let _ = send(err).await;
                    break;
                }
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Ok(http::sse(body))
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Other(serde::de::IgnoredAny),
}

pub async fn embeddings(
    state: &Arc<State>,
    req: Request<Incoming>,
    allowed: Allowed,
    log: &RequestLog,
) -> Result<Response<Body>, Failure> {
    let r: EmbeddingsRequest = http::read_json(state, req).await?;
    log.update(|f| f.model = Some(r.model.clone()));
    check_model(&allowed, &r.model)?;
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(Failure::bad_request(format!(
                "encoding_format '{other}' is not supported (float or base64)"
            )))
        }
    };
    let input = match r.input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
        Input::Other(_) => {
            return Err(Failure::bad_request(
                "input must be a string or a list of strings (token arrays are not supported)",
            ))
        }
    };
    let model = r.model.clone();
    let e = crate::spin::embeddings(state, log, r.model, input).await?;
    let data: Vec<Value> = e
        .embeddings
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let p = e.usage.prompt_token_count;
    Ok(http::json(
        StatusCode::OK,
        &json!({
            "object": "list", "data": data, "model": model,
            "usage": { "prompt_tokens": p, "total_tokens": p },
        }),
    ))
}

/// Standard base64 with padding (RFC 4648 §4), as OpenAI encodes little-endian f32 vectors.
fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(A[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /v1/models`: the registry's model folders (inferencing under `llama/`, embedding
/// models at the top), those the token may use.
pub async fn models(state: &Arc<State>, allowed: Allowed) -> Result<Response<Body>, Failure> {
    let reg = state.cfg.registry.clone();
    let names = tokio::task::spawn_blocking(move || {
        let mut names = Vec::new();
        let list = |dir: &std::path::Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            v.sort();
            v
        };
        names.extend(list(&reg.join("llama")));
        names.extend(
            list(&reg)
                .into_iter()
                .filter(|n| n != "llama" && reg.join(n).join("tokenizer.json").is_file()),
        );
        names
    })
    .await
    .map_err(|e| Failure::internal(format!("listing models failed: {e}")))?;
    let data: Vec<Value> = names
        .into_iter()
        .filter(|n| check_model(&allowed, n).is_ok())
        .map(|n| json!({ "id": n, "object": "model", "created": 0, "owned_by": "spinfer" }))
        .collect();
    Ok(http::json(
        StatusCode::OK,
        &json!({ "object": "list", "data": data }),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        // RFC 4648 §10 test vectors.
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64_encode(i.as_bytes()), o);
        }
    }
}

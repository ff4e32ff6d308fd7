//! Spin's remote protocol, `api_type = "default"` (contract §6): `POST /infer` and `POST /embed`
//! at the root, camelCase JSON, no content-type needed. Errors: a non-2xx status and
//! `{"error": {"variant": "<Spin error variant>", "message": "..."}}` (Spin itself ignores the
//! status and fails to parse this as a result, which it reports as a `runtime-error`).

use crate::auth::{check_model, Allowed};
use crate::generation;
use crate::http::{self, Body, Failure, RequestLog};
use crate::State;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use spinfer::{GenerateOptions, InferencingParams};
use std::sync::Arc;

#[derive(Deserialize)]
struct InferRequest {
    model: String,
    prompt: String,
    #[serde(default)]
    options: Options,
}

/// `inferencing-params` in camelCase; a missing field takes Spin's default.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Options {
    max_tokens: u32,
    repeat_penalty: f32,
    repeat_penalty_last_n_token_count: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
}

impl Default for Options {
    fn default() -> Self {
        let d = InferencingParams::default();
        Options {
            max_tokens: d.max_tokens,
            repeat_penalty: d.repeat_penalty,
            repeat_penalty_last_n_token_count: d.repeat_penalty_last_n_token_count,
            temperature: d.temperature,
            top_k: d.top_k,
            top_p: d.top_p,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InferReply {
    text: String,
    usage: InferUsage,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InferUsage {
    prompt_token_count: u32,
    generated_token_count: u32,
}

pub async fn infer(
    state: &Arc<State>,
    req: Request<Incoming>,
    allowed: Allowed,
    log: &RequestLog,
) -> Result<Response<Body>, Failure> {
    let r: InferRequest = http::read_json(state, req).await?;
    log.update(|f| f.model = Some(r.model.clone()));
    check_model(&allowed, &r.model)?;
    let o = r.options;
    let opts = GenerateOptions {
        params: InferencingParams {
            max_tokens: o.max_tokens,
            repeat_penalty: o.repeat_penalty,
            repeat_penalty_last_n_token_count: o.repeat_penalty_last_n_token_count,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
        },
        ..Default::default()
    };
    let (rx, _cancel) = generation::start(
        state,
        log,
        r.model,
        generation::Prompt::Text(r.prompt),
        opts,
        Vec::new(),
        false,
    )
    .await?;
    let out = generation::finish(rx).await?;
    Ok(http::json(
        StatusCode::OK,
        &InferReply {
            text: out.text,
            usage: InferUsage {
                prompt_token_count: out.usage.prompt_token_count,
                generated_token_count: out.usage.generated_token_count,
            },
        },
    ))
}

#[derive(Deserialize)]
struct EmbedRequest {
    model: String,
    input: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedReply {
    embeddings: Vec<Vec<f32>>,
    usage: EmbedUsage,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedUsage {
    prompt_token_count: u32,
}

pub async fn embed(
    state: &Arc<State>,
    req: Request<Incoming>,
    allowed: Allowed,
    log: &RequestLog,
) -> Result<Response<Body>, Failure> {
    let r: EmbedRequest = http::read_json(state, req).await?;
    log.update(|f| f.model = Some(r.model.clone()));
    check_model(&allowed, &r.model)?;
    let e = embeddings(state, log, r.model, r.input).await?;
    Ok(http::json(
        StatusCode::OK,
        &EmbedReply {
            embeddings: e.embeddings,
            usage: EmbedUsage {
                prompt_token_count: e.usage.prompt_token_count,
            },
        },
    ))
}

/// One embedding call on a blocking thread, within the engine-slot limit.
pub(crate) async fn embeddings(
    state: &Arc<State>,
    log: &RequestLog,
    model: String,
    input: Vec<String>,
) -> Result<spinfer::EmbeddingsResult, Failure> {
    let slot = state.slot().await?;
    let engine = Arc::clone(&state.engine);
    let log2 = log.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let m = log2.metrics();
        m.active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = engine.generate_embeddings(&model, &input);
        m.active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        r
    })
    .await
    .map_err(|e| Failure::internal(format!("the embedding task failed: {e}")))?;
    let r = r.map_err(|e| {
        let f = Failure::from(e);
        log.update(|l| l.error = Some(f.message.clone()));
        f
    })?;
    log.update(|f| {
        f.prompt_tokens = Some(r.usage.prompt_token_count);
        log.metrics().tokens(f);
    });
    Ok(r)
}

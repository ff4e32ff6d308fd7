//! Response bodies, errors in both protocols' shapes, request bodies with a size limit, and the
//! per-request log line.

use crate::State;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// A response body: all at once, or chunks from a generation thread. Dropping it (the response
/// is written, or the client went away) records the request's metrics and log line.
pub struct Body {
    inner: Inner,
    log: Option<Hold>,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body {
            inner: Inner::Full(Some(b.into())),
            log: None,
        }
    }
    pub fn stream(rx: mpsc::Receiver<Bytes>) -> Body {
        Body {
            inner: Inner::Stream(rx),
            log: None,
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.inner, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Server-sent events fed by `rx` (each item one or more complete `data: ...\n\n` events).
pub fn sse(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::stream(rx));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// Which error shape a route answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"error": {"variant": "invalid-input", "message": "..."}}` (Spin's error variant).
    Spin,
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
}

/// A request that failed: the status and what both protocols say about it.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    /// Spin's error variant name (`invalid-input`, `runtime-error`, `model-not-supported`).
    pub variant: &'static str,
    pub message: String,
    /// OpenAI's error `type` and `code`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (overload).
    pub retry_after: Option<u32>,
}

impl Failure {
    pub fn new(status: StatusCode, variant: &'static str, message: impl Into<String>) -> Failure {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Failure {
            status,
            variant,
            message: message.into(),
            kind,
            code: None,
            retry_after: None,
        }
    }
    pub fn with_openai(mut self, kind: &'static str, code: &'static str) -> Failure {
        self.kind = kind;
        self.code = Some(code);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, "invalid-input", message)
    }
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "runtime-error", message)
    }
    pub fn overloaded(message: impl Into<String>) -> Failure {
        let mut f = Failure::new(StatusCode::SERVICE_UNAVAILABLE, "runtime-error", message);
        f.retry_after = Some(1);
        f.code = Some("overloaded");
        f
    }
    pub fn timeout(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::GATEWAY_TIMEOUT, "runtime-error", message)
            .with_openai("server_error", "timeout")
    }
}

impl From<spinfer::Error> for Failure {
    /// The engine's Spin error: `invalid-input` is the caller's fault (400; an unknown model
    /// 404), `model-not-supported` 400, a `runtime-error` 500 unless it is an overload (503)
    /// or can never fit (400).
    fn from(e: spinfer::Error) -> Failure {
        use spinfer::{Cause, Error};
        match &e {
            Error::InvalidInput(m) if m.starts_with("no model directory found") => {
                Failure::new(StatusCode::NOT_FOUND, "invalid-input", m.clone())
                    .with_openai("invalid_request_error", "model_not_found")
            }
            Error::InvalidInput(m) => Failure::bad_request(m.clone()),
            Error::ModelNotSupported(r) => Failure::new(
                StatusCode::BAD_REQUEST,
                "model-not-supported",
                format!("model-not-supported: {r}"),
            )
            .with_openai("invalid_request_error", "model_not_supported"),
            Error::RuntimeError(r) if r.cause == Cause::Overloaded => {
                Failure::overloaded(r.message.clone())
            }
            // Never fits the engine's KV budget: the caller must ask for less (retrying is
            // useless), so a 400, still with Spin's variant.
            Error::RuntimeError(r) if r.cause == Cause::TooLarge => {
                Failure::new(StatusCode::BAD_REQUEST, "runtime-error", r.message.clone())
                    .with_openai("invalid_request_error", "request_too_large")
            }
            Error::RuntimeError(r) => Failure::internal(r.message.clone()),
        }
    }
}

pub fn error_response(style: ErrorStyle, f: &Failure) -> Response<Body> {
    let body = match style {
        ErrorStyle::Spin => serde_json::json!({
            "error": { "variant": f.variant, "message": f.message }
        }),
        ErrorStyle::OpenAi => serde_json::json!({
            "error": { "message": f.message, "type": f.kind, "param": null, "code": f.code }
        }),
    };
    let mut r = json(f.status, &body);
    if let Some(s) = f.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// Reads the whole body (at most `max_body_bytes`; 413 above) and parses it as JSON. No
/// content-type is required: Spin sends none.
pub async fn read_json<T: DeserializeOwned>(
    state: &State,
    req: Request<Incoming>,
) -> Result<T, Failure> {
    let max = state.cfg.max_body_bytes;
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid-input",
            format!("request body larger than {max} bytes"),
        )
    };
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n > max as u64)
        {
            return Err(too_large());
        }
    }
    let limited = http_body_util::Limited::new(req.into_body(), max);
    let collected = tokio::time::timeout(state.cfg.header_timeout, limited.collect())
        .await
        .map_err(|_| {
            Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid-input",
                "request body not received in time",
            )
        })?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(Failure::bad_request(format!(
                "cannot read request body: {e}"
            )))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))
}

/// What a handler learns about its request, for the log line.
#[derive(Default)]
pub struct Fields {
    pub model: Option<String>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub finish: Option<&'static str>,
    pub error: Option<String>,
}

struct LogInner {
    state: Arc<State>,
    route: &'static str,
    method: String,
    path: String,
    remote: SocketAddr,
    start: Instant,
    fields: Mutex<Fields>,
    /// Holds outstanding: the response body and any engine thread still working for it.
    holds: AtomicUsize,
    /// The response status; 499 (nginx's "client closed request") until the handler answers.
    status: AtomicU16,
    written: AtomicBool,
}

/// The request's log record, shared with its generation thread.
#[derive(Clone)]
pub struct RequestLog(Arc<LogInner>);

impl RequestLog {
    pub fn new(
        state: Arc<State>,
        route: &'static str,
        method: String,
        path: String,
        remote: SocketAddr,
        start: Instant,
    ) -> RequestLog {
        RequestLog(Arc::new(LogInner {
            state,
            route,
            method,
            path,
            remote,
            start,
            fields: Mutex::new(Fields::default()),
            holds: AtomicUsize::new(0),
            status: AtomicU16::new(499),
            written: AtomicBool::new(false),
        }))
    }

    pub fn update(&self, f: impl FnOnce(&mut Fields)) {
        f(&mut self.0.fields.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> std::time::Duration {
        self.0.start.elapsed()
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.0.state.metrics
    }

    /// Delays the log line until the returned hold is dropped as well (an engine thread holds
    /// one so that its usage and finish reason make it into the line).
    pub fn hold(&self) -> Hold {
        self.0.holds.fetch_add(1, Ordering::SeqCst);
        Hold(self.clone())
    }

    /// Hands the record to the response body: written when the body is done or dropped and no
    /// engine thread holds it any more.
    pub fn attach(&self, mut resp: Response<Body>) -> Response<Body> {
        let hold = self.hold();
        self.0
            .status
            .store(resp.status().as_u16(), Ordering::SeqCst);
        resp.body_mut().log = Some(hold);
        resp
    }

    fn write(&self) {
        let l = &self.0;
        let status = l.status.load(Ordering::SeqCst);
        if l.written.swap(true, Ordering::SeqCst) {
            return;
        }
        let secs = l.start.elapsed().as_secs_f64();
        l.state.metrics.request(l.route, status, secs);
        let f = l.fields.lock().unwrap_or_else(|e| e.into_inner());
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut line = serde_json::json!({
            "ts": (ts * 1e3).round() / 1e3,
            "remote": l.remote.to_string(),
            "method": l.method,
            "path": l.path,
            "status": status,
            "ms": (secs * 1e4).round() / 10.0,
            "model": f.model,
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "finish": f.finish,
            "error": f.error,
        });
        if let Some(o) = line.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        // One write per line so lines from concurrent requests never interleave.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// See [`RequestLog::hold`].
pub struct Hold(RequestLog);

impl Drop for Hold {
    fn drop(&mut self) {
        if self.0 .0.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.write();
        }
    }
}

//! `spinfer serve`: the engine over HTTP.
//!
//! - Spin's remote protocol (`api_type = "default"`): `POST /infer`, `POST /embed` at the root
//!   ([`spin`]).
//! - The OpenAI API (Spin's `api_type = "open_ai"` and every OpenAI client): `GET /v1/models`,
//!   `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/embeddings` ([`openai`]).
//! - Operations: `GET /health`, `GET /ready`, `GET /metrics` (Prometheus), one JSON access-log
//!   line per request on stderr, bearer tokens ([`auth`]), body size limit, header-read and
//!   request timeouts, a bounded number of active and queued requests, cancellation when the
//!   client goes away, graceful shutdown on SIGTERM/SIGINT.

pub mod auth;
mod generation;
mod http;
mod metrics;
pub mod openai;
pub mod spin;

use http::{error_response, Body, ErrorStyle, Failure};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use spinfer::{Engine, EngineOptions};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub use auth::Token;

/// Everything `spinfer serve` is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub registry: PathBuf,
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty: no authentication (loopback only unless
    /// `allow_unauthenticated`).
    pub tokens: Vec<Token>,
    /// Serve without tokens on a non-loopback address.
    pub allow_unauthenticated: bool,
    /// Models loaded before `/ready` answers 200.
    pub preload: Vec<String>,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// A client must send its request head within this time.
    pub header_timeout: Duration,
    /// A generation or embedding call is cancelled after this long (504, or an error event).
    pub request_timeout: Duration,
    /// After SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Engine calls running at once; more wait in the queue.
    pub max_active: usize,
    /// Calls waiting for a slot; past it the server answers 503 with `Retry-After`.
    pub max_queue: usize,
    /// The engine's batching and memory limits (KV budget, its own queue, batch size).
    pub engine: EngineOptions,
}

impl Config {
    pub fn new(registry: impl Into<PathBuf>) -> Config {
        Config {
            registry: registry.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
            allow_unauthenticated: false,
            preload: Vec::new(),
            max_body_bytes: 4 << 20,
            header_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            // As many as the engine batches together, so the batch can fill.
            max_active: EngineOptions::default().max_batch_sequences,
            max_queue: 64,
            engine: EngineOptions::default(),
        }
    }
}

/// Shared by every request.
pub struct State {
    pub engine: Arc<Engine>,
    pub cfg: Config,
    metrics: metrics::Metrics,
    limiter: Arc<tokio::sync::Semaphore>,
    queued: AtomicUsize,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl State {
    pub fn new(cfg: Config) -> Arc<State> {
        // The engine's `Cause::Overloaded` errors map to 503 + Retry-After (http.rs).
        let engine = Arc::new(Engine::with_options(&cfg.registry, cfg.engine.clone()));
        Arc::new(State {
            engine,
            limiter: Arc::new(tokio::sync::Semaphore::new(cfg.max_active.max(1))),
            cfg,
            metrics: metrics::Metrics::default(),
            queued: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// A slot to run one engine call: waits in the bounded queue, or is refused when it is full.
    async fn slot(&self) -> Result<Slot, Failure> {
        if let Ok(permit) = Arc::clone(&self.limiter).try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Failure::overloaded(
                "the server's request queue is full; retry later",
            ));
        }
        let permit = Arc::clone(&self.limiter).acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let permit = permit.map_err(|_| Failure::internal("the server is shutting down"))?;
        Ok(Slot { _permit: permit })
    }
}

/// Held while an engine call runs (moved into its blocking thread).
pub(crate) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Runs the server until SIGTERM or SIGINT, then drains. Blocking; builds its own runtime.
pub fn run(cfg: Config) -> Result<(), String> {
    if cfg.tokens.is_empty() && !cfg.listen.ip().is_loopback() && !cfg.allow_unauthenticated {
        return Err(format!(
            "no auth token configured: refusing to listen on {} (not loopback) without \
             authentication; give --auth-token-file or SPINFER_AUTH_TOKEN, or \
             --allow-unauthenticated",
            cfg.listen
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("spinfer-http")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        if cfg.tokens.is_empty() {
            eprintln!(
                "spinfer serve: no auth token configured: requests are not authenticated{}",
                if addr.ip().is_loopback() {
                    " (listening on loopback only)"
                } else {
                    " (--allow-unauthenticated)"
                }
            );
        } else {
            eprintln!(
                "spinfer serve: {} bearer token(s) configured",
                cfg.tokens.len()
            );
        }
        let state = State::new(cfg);
        preload(&state).await?;
        eprintln!(
            "spinfer serve: listening on http://{addr} (registry {})",
            state.cfg.registry.display()
        );
        serve(listener, Arc::clone(&state), shutdown_signal()).await;
        Ok(())
    })
}

/// Loads the configured models (each on a blocking thread); `/ready` answers 200 after.
async fn preload(state: &Arc<State>) -> Result<(), String> {
    for name in state.cfg.preload.clone() {
        let st = Arc::clone(state);
        let n = name.clone();
        let t0 = Instant::now();
        let r = tokio::task::spawn_blocking(move || load_model(&st.engine, &n))
            .await
            .map_err(|e| format!("loading '{name}' failed: {e}"))?;
        r.map_err(|e| format!("cannot load model '{name}': {e}"))?;
        eprintln!(
            "spinfer serve: loaded '{name}' in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    state.ready.store(true, Ordering::SeqCst);
    Ok(())
}

/// Loads `name` as an inferencing model when `<registry>/llama/<name>` exists, else as an
/// embedding model: a zero-token generation loads the model and tokenizes without computing.
pub fn load_model(engine: &Engine, name: &str) -> spinfer::Result<()> {
    spinfer::check_model_name(name)?;
    if engine.registry().join("llama").join(name).is_dir() {
        let opts = spinfer::GenerateOptions {
            params: spinfer::InferencingParams {
                max_tokens: 0,
                ..Default::default()
            },
            seed: Some(0),
            ..Default::default()
        };
        engine.generate(name, "a", &opts, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })?;
    } else {
        engine.generate_embeddings(name, &[] as &[&str])?;
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, then stops accepting and gives
/// in-flight requests `shutdown_grace` to finish.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        eprintln!("spinfer serve: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&state);
                let svc = hyper::service::service_fn(move |req| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(handle(st, req, remote).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    state.draining.store(true, Ordering::SeqCst);
    let grace = state.cfg.shutdown_grace;
    eprintln!(
        "spinfer serve: shutting down: no new connections; waiting up to {} s for in-flight requests",
        grace.as_secs()
    );
    tokio::select! {
        _ = graceful.shutdown() => eprintln!("spinfer serve: all requests finished"),
        _ = tokio::time::sleep(grace) => eprintln!("spinfer serve: shutdown deadline reached; exiting"),
    }
}

/// One request: route, answer, and (when the response body is done) metrics and the log line.
async fn handle(state: Arc<State>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = route_label(&method, &path);
    let log = http::RequestLog::new(
        Arc::clone(&state),
        route,
        method.to_string(),
        path.clone(),
        remote,
        start,
    );
    // Held while the handler runs: if the client goes away first, hyper drops this future and
    // the line is written (status 499) once any engine thread for it has stopped.
    let answering = log.hold();
    let resp = dispatch(&state, req, &log, route).await;
    let resp = log.attach(resp);
    drop(answering);
    resp
}

/// The metrics label of a route: the path of a known route, else "other" (unknown paths must not
/// grow the label set).
fn route_label(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (&Method::POST, "/infer") => "/infer",
        (&Method::POST, "/embed") => "/embed",
        (&Method::GET, "/v1/models") => "/v1/models",
        (&Method::POST, "/v1/completions") => "/v1/completions",
        (&Method::POST, "/v1/chat/completions") => "/v1/chat/completions",
        (&Method::POST, "/v1/embeddings") => "/v1/embeddings",
        (&Method::GET, "/health") => "/health",
        (&Method::GET, "/ready") => "/ready",
        (&Method::GET, "/metrics") => "/metrics",
        _ => "other",
    }
}

async fn dispatch(
    state: &Arc<State>,
    req: Request<Incoming>,
    log: &http::RequestLog,
    route: &'static str,
) -> Response<Body> {
    let style = if req.uri().path().starts_with("/v1/") {
        ErrorStyle::OpenAi
    } else {
        ErrorStyle::Spin
    };
    match route {
        "/health" => return http::text(StatusCode::OK, "ok\n"),
        "/ready" => {
            return if state.draining.load(Ordering::SeqCst) {
                http::text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if state.ready.load(Ordering::SeqCst) {
                http::text(StatusCode::OK, "ready\n")
            } else {
                http::text(StatusCode::SERVICE_UNAVAILABLE, "loading models\n")
            }
        }
        "/metrics" => return state.metrics.render(state),
        "other" => {
            let known = [
                "/infer",
                "/embed",
                "/v1/models",
                "/v1/completions",
                "/v1/chat/completions",
                "/v1/embeddings",
                "/health",
                "/ready",
                "/metrics",
            ];
            let f = if known.contains(&req.uri().path()) {
                Failure::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid-input",
                    format!("{} is not allowed on {}", req.method(), req.uri().path()),
                )
            } else {
                Failure::new(
                    StatusCode::NOT_FOUND,
                    "invalid-input",
                    format!("no route {} {}", req.method(), req.uri().path()),
                )
            };
            return error_response(style, &f);
        }
        _ => {}
    }
    let allowed = match auth::check(&state.cfg.tokens, req.headers()) {
        Ok(a) => a,
        Err(f) => return error_response(style, &f),
    };
    let r = match route {
        "/infer" => spin::infer(state, req, allowed, log).await,
        "/embed" => spin::embed(state, req, allowed, log).await,
        "/v1/models" => openai::models(state, allowed).await,
        "/v1/completions" => openai::completions(state, req, allowed, log).await,
        "/v1/chat/completions" => openai::chat_completions(state, req, allowed, log).await,
        "/v1/embeddings" => openai::embeddings(state, req, allowed, log).await,
        _ => Err(Failure::internal("unrouted")),
    };
    r.unwrap_or_else(|f| error_response(style, &f))
}

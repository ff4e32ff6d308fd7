//! A minimal host for one Spin HTTP component: `wasi:http/handler@0.3.0` (spin-sdk 6/7) or
//! `wasi:http/incoming-handler@0.2.0` (spin-sdk <= 5), its `fermyon:spin/llm` imports answered
//! by spinfer, outbound HTTP denied. Each request gets a fresh instance in a fresh store (as Spin
//! does), so a guest that traps costs only its own request.

use crate::SpinLlm;
use bytes::Bytes;
use futures::channel::oneshot;
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{AsContextMut, Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::handler::{Prepared, ProxyPre};
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// What one instance's store holds.
pub struct State {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: DenyOutbound,
    llm: SpinLlm,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The component may not make outbound requests: this host only answers its LLM calls.
struct DenyOutbound;

impl WasiHttpHooks for DenyOutbound {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// One compiled component, ready to serve requests (share it behind an `Arc`).
pub struct Host {
    engine: Engine,
    pre: ProxyPre<State>,
    llm: SpinLlm,
}

impl Host {
    /// Compiles the component at `wasm` and links it; `llm` is the state every instance's LLM
    /// calls start from (engine, `ai_models`, result limit).
    pub fn new(wasm: &Path, llm: SpinLlm) -> anyhow::Result<Host> {
        let mut config = Config::new();
        config.wasm_component_model_async(true);
        let engine = Engine::new(&config)?;
        let component = Component::from_file(&engine, wasm)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", wasm.display()))?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
        crate::add_to_linker(&mut linker, |s: &mut State| &mut s.llm)?;
        let instance_pre = linker.instantiate_pre(&component)?;
        // A component exporting wasi:http/handler@0.3 is p3; otherwise it must be p2.
        let pre = match wasmtime_wasi_http::p3::bindings::ServicePre::new(instance_pre.clone()) {
            Ok(p3) => ProxyPre::P3(p3),
            Err(_) => ProxyPre::P2(
                wasmtime_wasi_http::p2::bindings::ProxyPre::new(instance_pre).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: exports neither wasi:http/handler@0.3 nor wasi:http/incoming-handler@0.2: {e:#}",
                        wasm.display()
                    )
                })?,
            ),
        };
        Ok(Host { engine, pre, llm })
    }

    /// Whether the component is a p3 (`wasi:http/handler`) one.
    pub fn is_p3(&self) -> bool {
        matches!(self.pre, ProxyPre::P3(_))
    }

    /// Runs one request through a fresh instance; the response body is read in full. An error
    /// means the guest trapped or produced no response (the host goes on serving).
    pub async fn handle(&self, req: http::Request<Bytes>) -> anyhow::Result<http::Response<Bytes>> {
        let state = State {
            // stderr is inherited so that a guest's panic message shows in the host's log.
            wasi: WasiCtx::builder().inherit_stderr().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: DenyOutbound,
            llm: self.llm.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        let proxy = self.pre.instantiate_async(&mut store).await?;
        let req = req.map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync());
        let (tx, rx) = oneshot::channel();
        let view: fn(&mut State) -> WasiHttpCtxView<'_> = <State as WasiHttpView>::http;
        let proxy = &proxy;
        let response = store
            .run_concurrent(
                async move |accessor: &wasmtime::component::Accessor<State>| {
                    let prepared = accessor
                        .with(|mut s| Prepared::new(s.as_context_mut(), proxy, req, view, tx))?;
                    // The body is read while the guest runs: it may still be writing it.
                    let read = async {
                        let response = rx.await.map_err(|_| {
                            wasmtime::format_err!("the guest produced no response")
                        })??;
                        let (parts, body) = response.into_parts();
                        let body = body.collect().await?.to_bytes();
                        wasmtime::Result::<_>::Ok(http::Response::from_parts(parts, body))
                    };
                    let (ran, response) =
                        futures::future::join(prepared.run(accessor, std::future::pending()), read)
                            .await;
                    ran?;
                    response
                },
            )
            .await;
        Ok(response.and_then(|r| r)?)
    }
}

/// Serves `host` on `listener` until the process ends: each connection on its own task, each
/// request through [`Host::handle`]; a failed request is answered 500 with the reason.
pub async fn serve(host: Arc<Host>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let host = Arc::clone(&host);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let host = Arc::clone(&host);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let response =
                            match host.handle(http::Request::from_parts(parts, body)).await {
                                Ok(r) => r,
                                Err(e) => {
                                    eprintln!("spinfer-host: request failed: {e:#}");
                                    let mut r =
                                        http::Response::new(Bytes::from(format!("{e:#}\n")));
                                    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                                    r
                                }
                            };
                        Ok::<_, hyper::Error>(response.map(Full::new))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                eprintln!("spinfer-host: connection error: {e}");
            }
        });
    }
}

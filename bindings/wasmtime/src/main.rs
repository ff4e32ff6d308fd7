//! spinfer-host: runs one Spin HTTP component with its `fermyon:spin/llm` imports answered by
//! spinfer, without Spin itself.

use anyhow::{bail, Context};
use spinfer_wasmtime::host::{serve, Host};
use spinfer_wasmtime::SpinLlm;
use std::path::PathBuf;
use std::sync::Arc;

const USAGE: &str = "usage: spinfer-host --registry DIR --ai-models a,b \
(--listen ADDR | --request METHOD PATH) [--max-result-bytes N] app.wasm

  --registry DIR        Spin model registry (<app>/.spin/ai-models layout)
  --ai-models a,b       the models the component may call (the manifest's ai_models)
  --listen ADDR         serve HTTP on ADDR (e.g. 127.0.0.1:3000)
  --request METHOD PATH run one request, print the response body on stdout
  --max-result-bytes N  largest LLM result (default 128 MiB, as Spin)";

struct Args {
    registry: PathBuf,
    ai_models: Vec<String>,
    listen: Option<String>,
    request: Option<(String, String)>,
    max_result_bytes: usize,
    wasm: PathBuf,
}

fn parse() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut registry, mut ai_models, mut listen, mut request, mut wasm) =
        (None, Vec::new(), None, None, None);
    let mut max_result_bytes = spinfer_wasmtime::DEFAULT_MAX_RESULT_BYTES;
    let value = |it: &mut dyn Iterator<Item = String>, flag: &str| {
        it.next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--registry" => registry = Some(PathBuf::from(value(&mut it, &a)?)),
            "--ai-models" => {
                let list = value(&mut it, &a)?;
                ai_models.extend(list.split(',').filter(|s| !s.is_empty()).map(String::from));
            }
            "--listen" => listen = Some(value(&mut it, &a)?),
            "--request" => {
                let method = value(&mut it, &a)?;
                request = Some((method, value(&mut it, &a)?));
            }
            "--max-result-bytes" => {
                let v = value(&mut it, &a)?;
                max_result_bytes = v
                    .parse()
                    .with_context(|| format!("--max-result-bytes {v}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ if a.starts_with('-') => bail!("unknown option {a}\n{USAGE}"),
            _ if wasm.is_none() => wasm = Some(PathBuf::from(a)),
            _ => bail!("one component only (got {a} too)\n{USAGE}"),
        }
    }
    let registry = registry.with_context(|| format!("--registry is required\n{USAGE}"))?;
    let wasm = wasm.with_context(|| format!("the component (app.wasm) is required\n{USAGE}"))?;
    if listen.is_some() == request.is_some() {
        bail!("give one of --listen or --request\n{USAGE}");
    }
    Ok(Args {
        registry,
        ai_models,
        listen,
        request,
        max_result_bytes,
        wasm,
    })
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("spinfer-host: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = parse()?;
    let engine = Arc::new(spinfer::Engine::new(&args.registry));
    let llm = SpinLlm::new(engine, args.ai_models).with_max_result_bytes(args.max_result_bytes);
    let host = Arc::new(Host::new(&args.wasm, llm)?);
    if let Some((method, path)) = args.request {
        let req = http::Request::builder()
            .method(method.as_str())
            .uri(format!("http://localhost{path}"))
            .body(bytes::Bytes::new())
            .with_context(|| format!("request {method} {path}"))?;
        let response = host.handle(req).await?;
        use std::io::Write;
        std::io::stdout().write_all(response.body())?;
        if !response.status().is_success() {
            bail!("the component answered {}", response.status());
        }
        return Ok(());
    }
    let addr = args.listen.unwrap_or_default();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    eprintln!(
        "spinfer-host: serving {} ({}) on http://{}",
        args.wasm.display(),
        if host.is_p3() {
            "wasi:http/handler@0.3"
        } else {
            "wasi:http/incoming-handler@0.2"
        },
        listener.local_addr()?
    );
    serve(host, listener).await
}

//! Spin components built from the real spin-sdk (7.0.0: `wasi:http/handler@0.3.0`; 5.2.0:
//! `wasi:http/incoming-handler@0.2.0`) call spinfer through the host: their LLM calls return what
//! the library returns when called directly, errors arrive as the right WIT variants, and a
//! trapping guest costs only its own request.
//!
//! The guests (tests/guests/sdk7, tests/guests/sdk5, routes in tests/guests/common.rs) are built
//! here with `cargo build --target wasm32-wasip2 --release` into target/guests/. Needs the
//! wasm32-wasip2 target (`rustup target add wasm32-wasip2`) and the real all-MiniLM-L6-v2
//! (`fixtures/fetch-minilm.sh`).

use bytes::Bytes;
use spinfer::{Engine, InferencingParams};
use spinfer_wasmtime::host::{serve, Host};
use spinfer_wasmtime::SpinLlm;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// The guests' defaults (tests/guests/common.rs).
const LLAMA: &str = "tiny-llama";
const PROMPT: &str = "Once upon a time";
const TEXTS: [&str; 2] = [
    "The cat sits on the mat.",
    "A Spin component calls spinfer.",
];
const MINILM: &str = "all-minilm-l6-v2";
/// `/greedy`'s parameters (tests/guests/common.rs): temperature 0, so the output is
/// deterministic (the WIT path otherwise samples with a fresh seed, as Spin does).
const GREEDY: InferencingParams = InferencingParams {
    max_tokens: 12,
    repeat_penalty: 1.1,
    repeat_penalty_last_n_token_count: 64,
    temperature: 0.0,
    top_k: 40,
    top_p: 0.9,
};
/// The component's `ai_models`: "llama2-chat" (used by `/denied`) is deliberately absent;
/// "no-such-model" is allowed but has no folder.
const AI_MODELS: [&str; 3] = [LLAMA, MINILM, "no-such-model"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One registry holding the tiny Llama fixture and the real MiniLM (they live in two folders),
/// made of symlinks under target/.
fn registry() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = root();
        let minilm = root.join("fixtures/real/registry").join(MINILM);
        assert!(
            minilm.join("model.safetensors").is_file(),
            "{} is missing: run fixtures/fetch-minilm.sh",
            minilm.display()
        );
        let dir = root.join("target/guests/registry");
        std::fs::create_dir_all(dir.join("llama")).unwrap();
        let link = |target: PathBuf, link: PathBuf| {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target.canonicalize().unwrap(), &link).unwrap();
        };
        link(
            root.join("fixtures/registry/llama").join(LLAMA),
            dir.join("llama").join(LLAMA),
        );
        link(minilm, dir.join(MINILM));
        dir
    })
}

/// Builds guest `name` (once per test process) and returns its component.
fn guest(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    // A missing target is the usual cause of a failed build: say so plainly.
    let libdir = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .expect("rustc runs");
    let libdir = String::from_utf8_lossy(&libdir.stdout).trim().to_string();
    assert!(
        !libdir.is_empty() && Path::new(&libdir).is_dir(),
        "the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`"
    );
    let root = root();
    let manifest = root.join(format!("bindings/wasmtime/tests/guests/{name}/Cargo.toml"));
    let target_dir = root.join("target/guests");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // The host build's flags are not meant for the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {} failed", manifest.display());
    let wasm = target_dir.join(format!("wasm32-wasip2/release/spinfer_guest_{name}.wasm"));
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    built.push((name.to_string(), wasm.clone()));
    wasm
}

fn host(name: &str) -> Host {
    let engine = Arc::new(Engine::new(registry()));
    Host::new(&guest(name), SpinLlm::new(engine, AI_MODELS)).unwrap()
}

async fn get(host: &Host, path: &str) -> anyhow::Result<(u16, String)> {
    let req = http::Request::get(format!("http://localhost{path}"))
        .body(Bytes::new())
        .unwrap();
    let r = host.handle(req).await?;
    Ok((r.status().as_u16(), String::from_utf8(r.body().to_vec())?))
}

async fn ok(host: &Host, path: &str) -> String {
    let (status, body) = get(host, path).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The guests' formats (tests/guests/common.rs), built from the library's own results.
fn expected_text(r: spinfer::Result<spinfer::InferencingResult>) -> String {
    match r {
        Ok(r) => format!(
            "ok {} {}\n{}",
            r.usage.prompt_token_count, r.usage.generated_token_count, r.text
        ),
        Err(e) => expected_error(e),
    }
}

fn expected_error(e: spinfer::Error) -> String {
    match e {
        spinfer::Error::ModelNotSupported(_) => "err model-not-supported".to_string(),
        spinfer::Error::RuntimeError(r) => format!("err runtime-error: {}", r.message),
        spinfer::Error::InvalidInput(m) => format!("err invalid-input: {m}"),
    }
}

fn expected_embeddings(r: spinfer::EmbeddingsResult) -> String {
    let dims = r.embeddings.first().map_or(0, Vec::len);
    let mut out = format!(
        "ok {} {}x{}",
        r.usage.prompt_token_count,
        r.embeddings.len(),
        dims
    );
    for v in &r.embeddings {
        // `{:?}` prints the shortest string that reads back as the same f32, in the guest as
        // here: equal strings mean bit-equal vectors.
        let vals: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
        out.push('\n');
        out.push_str(&vals.join(" "));
    }
    out
}

/// Every route of one guest against the library called directly.
async fn check_guest(name: &str) {
    let host = host(name);
    assert_eq!(host.is_p3(), name == "sdk7", "{name}: handler kind");
    let direct = Engine::new(registry());

    // Explicit greedy parameters: text and usage equal the library's.
    let want = expected_text(direct.infer_with_options(LLAMA, PROMPT, GREEDY));
    assert!(want.starts_with("ok "), "{want}");
    assert_eq!(ok(&host, "/greedy").await, want, "{name} /greedy");
    // The query reaches the guest (another prompt, percent-encoded).
    let want = expected_text(direct.infer_with_options(LLAMA, "Hello, world", GREEDY));
    assert_eq!(
        ok(&host, "/greedy?prompt=Hello%2C+world").await,
        want,
        "{name} /greedy?prompt"
    );

    // No params: Spin's defaults, sampled with a fresh seed, so only the usage is comparable:
    // the same prompt tokens, and at most max-tokens' default of 100 generated.
    let body = ok(&host, "/infer").await;
    let direct_prompt = direct
        .infer_with_options(
            LLAMA,
            PROMPT,
            InferencingParams {
                max_tokens: 0,
                ..GREEDY
            },
        )
        .unwrap()
        .usage
        .prompt_token_count;
    let head = body.lines().next().unwrap();
    let counts: Vec<u32> = head
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("{name} /infer: {body}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[0], direct_prompt, "{name} /infer prompt tokens");
    assert!(
        (1..=100).contains(&counts[1]),
        "{name} /infer generated {}",
        counts[1]
    );

    // Embeddings on the real all-MiniLM-L6-v2: bit-equal vectors and the same usage.
    let want = expected_embeddings(direct.generate_embeddings(MINILM, &TEXTS).unwrap());
    assert!(
        want.starts_with("ok ") && want.contains(" 2x384\n"),
        "{want}"
    );
    assert_eq!(ok(&host, "/embed").await, want, "{name} /embed");

    // A model outside ai_models: Spin's sentence, word for word (contract §3).
    assert_eq!(
        ok(&host, "/denied").await,
        "err invalid-input: The component does not have access to use 'llama2-chat'. To give the \
         component access, add 'llama2-chat' to the 'ai_models' key for the component in your \
         spin.toml manifest"
    );
    // Allowed but absent: Spin's invalid-input for inferencing, model-not-supported for
    // embeddings (contract §2).
    assert_eq!(
        ok(&host, "/unknown").await,
        "err invalid-input: no model directory found in registry for model 'no-such-model'"
    );
    assert_eq!(
        ok(&host, "/unknown-embedding").await,
        "err model-not-supported"
    );
    // A bad parameter: the library's invalid-input message.
    let bad = InferencingParams {
        top_p: -0.5,
        ..InferencingParams::default()
    };
    let want = expected_text(direct.infer_with_options(LLAMA, PROMPT, bad));
    assert!(want.starts_with("err invalid-input: "), "{want}");
    assert_eq!(ok(&host, "/bad-param").await, want, "{name} /bad-param");

    // A trap fails its own request only: the same host answers the next one.
    let trapped = get(&host, "/trap").await;
    assert!(trapped.is_err(), "{name} /trap: {trapped:?}");
    assert!(
        ok(&host, "/greedy").await.starts_with("ok "),
        "{name} after a trap"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spin_sdk7_p3_guest() {
    check_guest("sdk7").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spin_sdk5_p2_guest() {
    check_guest("sdk5").await;
}

/// One raw HTTP/1.1 request over TCP (no client crate): status and body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The server (`--listen`): a trap is a 500 for that request, and the server goes on.
#[tokio::test(flavor = "multi_thread")]
async fn server_survives_a_trapping_guest() {
    let host = Arc::new(host("sdk7"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(host, listener));
    let want = expected_text(Engine::new(registry()).infer_with_options(LLAMA, PROMPT, GREEDY));
    let (trap, (status, body)) =
        tokio::task::spawn_blocking(move || (http_get(addr, "/trap"), http_get(addr, "/greedy")))
            .await
            .unwrap();
    assert_eq!(trap.0, 500, "{}", trap.1);
    assert_eq!((status, body), (200, want));
}

/// The binary's one-request mode prints the body the guest wrote.
#[test]
fn cli_request_prints_the_response() {
    let wasm = guest("sdk5");
    let out = Command::new(env!("CARGO_BIN_EXE_spinfer-host"))
        .arg("--registry")
        .arg(registry())
        .args([
            "--ai-models",
            &AI_MODELS.join(","),
            "--request",
            "GET",
            "/greedy",
        ])
        .arg(&wasm)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected_text(Engine::new(registry()).infer_with_options(LLAMA, PROMPT, GREEDY));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
}

/// The host's byte limit on results: a limit below the answer's size is a runtime-error.
#[tokio::test(flavor = "multi_thread")]
async fn result_limit_is_a_runtime_error() {
    let engine = Arc::new(Engine::new(registry()));
    // 2 x 384 floats are 3072 bytes; a 3071-byte limit refuses them, a 3072-byte one does not.
    let llm = SpinLlm::new(engine, AI_MODELS);
    let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    let refused = llm
        .clone()
        .with_max_result_bytes(3071)
        .generate_embeddings(MINILM.into(), texts.clone())
        .await;
    assert_eq!(
        refused.map_err(expected_error),
        Err("err runtime-error: the result (3072 bytes) is larger than the host's limit of 3071 bytes".to_string())
    );
    let fits = llm
        .with_max_result_bytes(3072)
        .generate_embeddings(MINILM.into(), texts)
        .await;
    assert_eq!(fits.unwrap().embeddings.len(), 2);
}

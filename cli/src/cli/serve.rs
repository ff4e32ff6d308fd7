//! `spinfer serve`: the HTTP server (Spin's remote protocol and the OpenAI API).

use super::{Arg, Failure, Parser, DEFAULT_REGISTRY};
use std::time::Duration;

pub const USAGE: &str = "\
Usage: spinfer serve [options]

Serves the registry's models over HTTP: Spin's remote protocol (POST /infer, /embed) and the
OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings), with /health,
/ready and Prometheus /metrics. One JSON access-log line per request on stderr. SIGTERM or
SIGINT: stop accepting, let in-flight requests finish (up to --shutdown-grace), exit 0.

Options:
  --registry DIR            model registry [default: .spin/ai-models]
  --listen ADDR             address:port to listen on [default: 127.0.0.1:8080]
  --auth-token-file F       accepted bearer tokens, one per line: TOKEN [model,model,...]
                            (a model list limits that token to those models, like ai_models)
                            The environment variable SPINFER_AUTH_TOKEN adds one more token.
                            Without any token the server only listens on loopback...
  --allow-unauthenticated   ...unless this is given
  --models a,b              load these models at start; /ready answers 200 once they are loaded
  --max-body-bytes N        largest request body [default: 4194304]
  --request-timeout SECS    cancel a generation after this long [default: 600]
  --header-timeout SECS     time to send a request's head and body [default: 30]
  --shutdown-grace SECS     time in-flight requests get after SIGTERM [default: 30]
  --max-active N            engine calls running at once [default: 16]
  --max-queue N             calls waiting beyond those; more get 503 + Retry-After [default: 64]
  --kv-budget-bytes N       KV cache memory for all sequences and the prefix cache
                            [default: half of the memory available at start]
  --max-batch N             most sequences decoding together per model [default: 16]
  --prefill-chunk N         most prompt tokens a step prefills beside running decodes [default: 128]
  --no-prefix-cache         do not keep recent prompts' KV for reuse
  -h, --help                this message
";

pub fn run(args: Vec<String>) -> Result<(), Failure> {
    let mut p = Parser::new(args, USAGE);
    let mut cfg = spinfer_server::Config::new(DEFAULT_REGISTRY);
    let mut token_file = None;
    let secs = |n: u64| Duration::from_secs(n);
    while let Some(arg) = p.next_arg() {
        match arg {
            Arg::Positional(a) => return Err(p.usage_error(format!("unexpected argument '{a}'"))),
            Arg::Flag(f, v) => match f.as_str() {
                "--help" => return Err(Failure::Help(USAGE)),
                "--registry" => cfg.registry = p.value(&f, v)?.into(),
                "--listen" => cfg.listen = p.parsed(&f, v, "an address like 127.0.0.1:8080")?,
                "--auth-token-file" => token_file = Some(p.value(&f, v)?),
                "--allow-unauthenticated" => {
                    p.no_flag_value(&f, &v)?;
                    cfg.allow_unauthenticated = true;
                }
                "--models" => {
                    cfg.preload = p
                        .value(&f, v)?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "--max-body-bytes" => cfg.max_body_bytes = p.parsed(&f, v, "a whole number")?,
                "--request-timeout" => {
                    cfg.request_timeout = secs(p.parsed(&f, v, "whole seconds")?)
                }
                "--header-timeout" => {
                    cfg.header_timeout = secs(p.parsed(&f, v, "whole seconds")?)
                }
                "--shutdown-grace" => {
                    cfg.shutdown_grace = secs(p.parsed(&f, v, "whole seconds")?)
                }
                "--max-active" => cfg.max_active = p.parsed(&f, v, "a whole number")?,
                "--max-queue" => cfg.max_queue = p.parsed(&f, v, "a whole number")?,
                "--kv-budget-bytes" => {
                    cfg.engine.kv_budget_bytes = p.parsed(&f, v, "a whole number of bytes")?
                }
                "--max-batch" => {
                    cfg.engine.max_batch_sequences = p.parsed(&f, v, "a whole number")?
                }
                "--prefill-chunk" => {
                    cfg.engine.prefill_chunk = p.parsed(&f, v, "a whole number")?
                }
                "--no-prefix-cache" => {
                    p.no_flag_value(&f, &v)?;
                    cfg.engine.prefix_cache = false;
                }
                _ => return Err(p.unknown(&f)),
            },
        }
    }
    for m in &cfg.preload {
        spinfer::check_model_name(m)?;
    }
    if let Some(f) = token_file {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| Failure::Io(format!("cannot read --auth-token-file {f}: {e}")))?;
        cfg.tokens = spinfer_server::auth::parse_token_file(&text)
            .map_err(|e| Failure::Io(format!("--auth-token-file {f}: {e}")))?;
    }
    if let Ok(t) = std::env::var("SPINFER_AUTH_TOKEN") {
        if !t.trim().is_empty() {
            cfg.tokens.push(spinfer_server::Token {
                secret: t.trim().as_bytes().to_vec(),
                models: None,
            });
        }
    }
    spinfer_server::run(cfg).map_err(Failure::Io)
}

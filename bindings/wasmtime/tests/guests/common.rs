// The routes both guests serve, on whichever spin-sdk includes this file (its `llm` module has
// the same names in 5.2 and 7). Each answers 200 with a plain-text body that the tests rebuild
// from the library's own results (tests/guests.rs: `expected_*`), so the formats are fixed:
//   ok <prompt-token-count> <generated-token-count>\n<text>
//   ok <prompt-token-count> <vectors>x<dims>\n<v0 values as {:?}, space-separated>\n...
//   err <variant>[: <message>]
// Query: `model=` and `prompt=` (percent-encoded) override the defaults below.

use spin_sdk::llm::{self, EmbeddingModel, InferencingModel, InferencingParams};

const LLAMA: &str = "tiny-llama";
const PROMPT: &str = "Once upon a time";
/// The texts `/embed` sends (tests/guests.rs embeds the same ones directly).
const TEXTS: [&str; 2] = ["The cat sits on the mat.", "A Spin component calls spinfer."];

fn route(path_and_query: &str) -> String {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let arg = |key: &str| -> Option<String> {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
    };
    let model = arg("model").unwrap_or_else(|| LLAMA.to_string());
    let prompt = arg("prompt").unwrap_or_else(|| PROMPT.to_string());
    let m = InferencingModel::Other(&model);
    match path {
        // Spin's defaults: the SDK sends no params.
        "/infer" => text(llm::infer(m, &prompt)),
        // Explicit greedy parameters, equal to tests/guests.rs GREEDY.
        "/greedy" => text(llm::infer_with_options(
            m,
            &prompt,
            InferencingParams {
                max_tokens: 12,
                repeat_penalty: 1.1,
                repeat_penalty_last_n_token_count: 64,
                temperature: 0.0,
                top_k: 40,
                top_p: 0.9,
            },
        )),
        "/embed" => {
            let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
            let r = llm::generate_embeddings(EmbeddingModel::AllMiniLmL6V2, &texts);
            match r {
                Ok(r) => {
                    let dims = r.embeddings.first().map_or(0, Vec::len);
                    let mut out =
                        format!("ok {} {}x{}", r.usage.prompt_token_count, r.embeddings.len(), dims);
                    for v in &r.embeddings {
                        let vals: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
                        out.push('\n');
                        out.push_str(&vals.join(" "));
                    }
                    out
                }
                Err(e) => error(e),
            }
        }
        // Not in the component's ai_models.
        "/denied" => text(llm::infer(InferencingModel::Llama2Chat, &prompt)),
        // In ai_models, but no such folder in the registry.
        "/unknown" => text(llm::infer(InferencingModel::Other("no-such-model"), &prompt)),
        "/unknown-embedding" => {
            let r = llm::generate_embeddings(EmbeddingModel::Other("no-such-model"), &[prompt]);
            match r {
                Ok(_) => "ok".to_string(),
                Err(e) => error(e),
            }
        }
        // A negative top-p is invalid.
        "/bad-param" => text(llm::infer_with_options(
            m,
            &prompt,
            InferencingParams {
                top_p: -0.5,
                ..InferencingParams::default()
            },
        )),
        "/trap" => panic!("the guest traps on purpose"),
        _ => format!("err no route {path}"),
    }
}

fn text(r: Result<llm::InferencingResult, llm::Error>) -> String {
    match r {
        Ok(r) => format!(
            "ok {} {}\n{}",
            r.usage.prompt_token_count, r.usage.generated_token_count, r.text
        ),
        Err(e) => error(e),
    }
}

fn error(e: llm::Error) -> String {
    match e {
        llm::Error::ModelNotSupported => "err model-not-supported".to_string(),
        llm::Error::RuntimeError(m) => format!("err runtime-error: {m}"),
        llm::Error::InvalidInput(m) => format!("err invalid-input: {m}"),
    }
}

/// `%XX` and `+` decoding of a query value (invalid escapes are kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

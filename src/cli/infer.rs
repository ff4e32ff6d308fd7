//! `spinfer infer`: text generation, streamed to stdout.

use super::{Arg, Failure, Parser, DEFAULT_REGISTRY};
use spinfer::{ChatMessage, Engine, InferencingParams};
use std::io::{Read, Write};

pub const USAGE: &str = "\
Usage: spinfer infer --model NAME [options] [PROMPT]

Generates a continuation of PROMPT (read from stdin when absent, byte for byte)
and streams it to stdout as it is produced, followed by a newline. Put `--` before a prompt that
starts with `-`. Errors go to stderr as `error: <spin-error-variant>: <message>` (exit 1).

Options (defaults are Spin's):
  --model NAME                 model folder <registry>/llama/NAME (required)
  --registry DIR               model registry [default: .spin/ai-models]
  --allow NAME                 the component's ai_models list (repeatable); without any --allow
                               every model is allowed
  --max-tokens N               most tokens to generate [default: 100]
  --temperature T              <= 0 means greedy [default: 0.8]
  --top-k K                    0 means no limit [default: 40]
  --top-p P                    >= 1 means no cut [default: 0.9]
  --repeat-penalty R           1 disables it [default: 1.1]
  --repeat-penalty-last-n N    tokens the penalty looks back at [default: 64]
  --seed S                     fix the sampler's seed (reproducible output) [default: random]
  --chat                       PROMPT is a user message: apply the model's chat template
  --system TEXT                with --chat: a system message before it
  --json                       print only {\"text\": ..., \"usage\": {\"prompt_token_count\": n,
                               \"generated_token_count\": n}}
  -h, --help                   this message
";

pub fn run(args: Vec<String>) -> Result<(), Failure> {
    let mut p = Parser::new(args, USAGE);
    let mut model = None;
    let mut registry = DEFAULT_REGISTRY.to_string();
    let mut allow: Vec<String> = Vec::new();
    let mut params = InferencingParams::default();
    let mut seed: Option<u64> = None;
    let mut json = false;
    let mut chat = false;
    let mut system: Option<String> = None;
    let mut prompt: Option<String> = None;
    while let Some(arg) = p.next_arg() {
        match arg {
            Arg::Positional(a) => {
                if prompt.is_some() {
                    return Err(p.usage_error(
                        "infer takes one PROMPT argument (quote a prompt with spaces)",
                    ));
                }
                prompt = Some(a);
            }
            Arg::Flag(f, v) => match f.as_str() {
                "--help" => return Err(Failure::Help(USAGE)),
                "--model" => model = Some(p.value(&f, v)?),
                "--registry" => registry = p.value(&f, v)?,
                "--allow" => allow.push(p.value(&f, v)?),
                "--max-tokens" => params.max_tokens = p.parsed(&f, v, "a whole number >= 0")?,
                "--temperature" => params.temperature = p.parsed(&f, v, "a number")?,
                "--top-k" => params.top_k = p.parsed(&f, v, "a whole number >= 0")?,
                "--top-p" => params.top_p = p.parsed(&f, v, "a number")?,
                "--repeat-penalty" => params.repeat_penalty = p.parsed(&f, v, "a number")?,
                "--repeat-penalty-last-n" => {
                    params.repeat_penalty_last_n_token_count =
                        p.parsed(&f, v, "a whole number >= 0")?
                }
                "--seed" => seed = Some(p.parsed(&f, v, "a whole number (0 to 2^64-1)")?),
                "--json" => {
                    p.no_flag_value(&f, &v)?;
                    json = true
                }
                "--chat" => {
                    p.no_flag_value(&f, &v)?;
                    chat = true
                }
                "--system" => system = Some(p.value(&f, v)?),
                _ => return Err(p.unknown(&f)),
            },
        }
    }
    let model = model.ok_or_else(|| p.usage_error("--model NAME is required"))?;
    let prompt = match prompt {
        Some(p) => p,
        None => read_stdin_prompt()?,
    };

    let engine = Engine::new(registry);
    // Without --allow every model is allowed: the component's list is just the requested one.
    let allowed = if allow.is_empty() {
        vec![model.clone()]
    } else {
        allow
    };
    let component = engine.component(allowed);
    if system.is_some() && !chat {
        return Err(p.usage_error("--system needs --chat"));
    }
    let prompt = if chat {
        let mut messages: Vec<ChatMessage> = system
            .into_iter()
            .map(|s| ChatMessage::new("system", s))
            .collect();
        messages.push(ChatMessage::new("user", prompt));
        component.chat_prompt(&model, &messages)?
    } else {
        prompt
    };

    if json {
        let r = match seed {
            Some(s) => component.infer_with_seed(&model, &prompt, params, s)?,
            None => component.infer_with_options(&model, &prompt, params)?,
        };
        // Fields in the order the interface lists them.
        let out = serde_json::to_string(&JsonResult {
            text: &r.text,
            usage: JsonUsage {
                prompt_token_count: r.usage.prompt_token_count,
                generated_token_count: r.usage.generated_token_count,
            },
        })
        .map_err(|e| Failure::Io(format!("cannot serialise the result: {e}")))?;
        println!("{out}");
        return Ok(());
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_failed = None;
    let mut emit = |frag: &str| {
        if write_failed.is_none() {
            if let Err(e) = out.write_all(frag.as_bytes()).and_then(|_| out.flush()) {
                write_failed = Some(e);
            }
        }
    };
    component.infer_streaming(&model, &prompt, params, seed, &mut emit)?;
    if let Some(e) = write_failed {
        return Err(Failure::Io(format!("writing to stdout failed: {e}")));
    }
    writeln!(out)
        .and_then(|_| out.flush())
        .map_err(|e| Failure::Io(format!("writing to stdout failed: {e}")))
}

#[derive(serde::Serialize)]
struct JsonResult<'a> {
    text: &'a str,
    usage: JsonUsage,
}

#[derive(serde::Serialize)]
struct JsonUsage {
    prompt_token_count: u32,
    generated_token_count: u32,
}

fn read_stdin_prompt() -> Result<String, Failure> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("spinfer: reading the prompt from stdin (end it with Ctrl-D)");
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| Failure::Io(format!("reading the prompt from stdin failed: {e}")))?;
    // The bytes as given: a chat prompt ending in "assistant\n" needs its newline.
    Ok(s)
}

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

pub const CHAT_USAGE: &str = "\
Usage: spinfer chat --model NAME [options]

A conversation on the terminal: each line you type is a user message; the model's answer,
rendered through its chat template with the whole conversation so far, is streamed back.
End with Ctrl-D. Takes `spinfer infer`'s options (except --json and --chat).
";

/// What `infer` and `chat` take from the command line.
struct Options {
    model: String,
    registry: String,
    allow: Vec<String>,
    params: InferencingParams,
    seed: Option<u64>,
    json: bool,
    chat: bool,
    system: Option<String>,
    prompt: Option<String>,
}

fn parse(args: Vec<String>, usage: &'static str) -> Result<Options, Failure> {
    let mut p = Parser::new(args, usage);
    let mut model = None;
    let mut o = Options {
        model: String::new(),
        registry: DEFAULT_REGISTRY.to_string(),
        allow: Vec::new(),
        params: InferencingParams::default(),
        seed: None,
        json: false,
        chat: false,
        system: None,
        prompt: None,
    };
    let is_chat = usage == CHAT_USAGE;
    while let Some(arg) = p.next_arg() {
        match arg {
            Arg::Positional(_) if is_chat => {
                return Err(p.usage_error("chat takes no PROMPT: type the messages"))
            }
            Arg::Positional(a) => {
                if o.prompt.is_some() {
                    return Err(p.usage_error(
                        "infer takes one PROMPT argument (quote a prompt with spaces)",
                    ));
                }
                o.prompt = Some(a);
            }
            Arg::Flag(f, v) => match f.as_str() {
                "--help" => return Err(Failure::Help(usage)),
                "--model" => model = Some(p.value(&f, v)?),
                "--registry" => o.registry = p.value(&f, v)?,
                "--allow" => o.allow.push(p.value(&f, v)?),
                "--max-tokens" => o.params.max_tokens = p.parsed(&f, v, "a whole number >= 0")?,
                "--temperature" => o.params.temperature = p.parsed(&f, v, "a number")?,
                "--top-k" => o.params.top_k = p.parsed(&f, v, "a whole number >= 0")?,
                "--top-p" => o.params.top_p = p.parsed(&f, v, "a number")?,
                "--repeat-penalty" => o.params.repeat_penalty = p.parsed(&f, v, "a number")?,
                "--repeat-penalty-last-n" => {
                    o.params.repeat_penalty_last_n_token_count =
                        p.parsed(&f, v, "a whole number >= 0")?
                }
                "--seed" => o.seed = Some(p.parsed(&f, v, "a whole number (0 to 2^64-1)")?),
                "--system" => o.system = Some(p.value(&f, v)?),
                "--json" if !is_chat => {
                    p.no_flag_value(&f, &v)?;
                    o.json = true
                }
                "--chat" if !is_chat => {
                    p.no_flag_value(&f, &v)?;
                    o.chat = true
                }
                _ => return Err(p.unknown(&f)),
            },
        }
    }
    o.model = model.ok_or_else(|| p.usage_error("--model NAME is required"))?;
    if o.system.is_some() && !o.chat && !is_chat {
        return Err(p.usage_error("--system needs --chat"));
    }
    Ok(o)
}

/// The component's `ai_models`: without --allow every model is allowed, so the list is just
/// the requested one.
fn allowed(o: &Options) -> Vec<String> {
    if o.allow.is_empty() {
        vec![o.model.clone()]
    } else {
        o.allow.clone()
    }
}

/// `text` streamed to stdout as it comes, then a newline.
fn stream(
    component: &spinfer::Component<'_>,
    o: &Options,
    prompt: &str,
) -> Result<String, Failure> {
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
    let r = component.infer_streaming(&o.model, prompt, o.params, o.seed, &mut emit)?;
    if let Some(e) = write_failed {
        return Err(Failure::Io(format!("writing to stdout failed: {e}")));
    }
    writeln!(out)
        .and_then(|_| out.flush())
        .map_err(|e| Failure::Io(format!("writing to stdout failed: {e}")))?;
    Ok(r.text)
}

pub fn run(args: Vec<String>) -> Result<(), Failure> {
    let o = parse(args, USAGE)?;
    let prompt = match &o.prompt {
        Some(p) => p.clone(),
        None => read_stdin_prompt()?,
    };
    let engine = Engine::new(&o.registry);
    let component = engine.component(allowed(&o));
    let prompt = if o.chat {
        let mut messages: Vec<ChatMessage> = o
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s.as_str()))
            .collect();
        messages.push(ChatMessage::new("user", prompt));
        component.chat_prompt(&o.model, &messages)?
    } else {
        prompt
    };

    if o.json {
        let r = match o.seed {
            Some(s) => component.infer_with_seed(&o.model, &prompt, o.params, s)?,
            None => component.infer_with_options(&o.model, &prompt, o.params)?,
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
    stream(&component, &o, &prompt).map(|_| ())
}

/// `spinfer chat`: read a line, answer it with the whole conversation as context, repeat.
pub fn run_chat(args: Vec<String>) -> Result<(), Failure> {
    use std::io::{BufRead, IsTerminal};
    let o = parse(args, CHAT_USAGE)?;
    let engine = Engine::new(&o.registry);
    let component = engine.component(allowed(&o));
    let mut messages: Vec<ChatMessage> = o
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let tty = std::io::stdin().is_terminal();
    let prompt_sign = || {
        if tty {
            eprint!("> ");
        }
    };
    prompt_sign();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Failure::Io(format!("reading stdin failed: {e}")))?;
        if line.trim().is_empty() {
            prompt_sign();
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        let prompt = component.chat_prompt(&o.model, &messages)?;
        let answer = stream(&component, &o, &prompt)?;
        messages.push(ChatMessage::new("assistant", answer));
        prompt_sign();
    }
    Ok(())
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

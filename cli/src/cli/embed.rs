//! `spinfer embed`: sentence embeddings.

use super::{Arg, Failure, Parser, DEFAULT_REGISTRY};
use spinfer::Engine;
use std::io::{BufRead, Write};

pub const USAGE: &str = "\
Usage: spinfer embed --model NAME [options] [--] TEXT...

Embeds each TEXT (or each line of stdin when no TEXT is given) and prints one vector per line,
its values separated by spaces.

Options:
  --model NAME      model folder <registry>/NAME (required)
  --registry DIR    model registry [default: .spin/ai-models]
  --allow NAME      the component's ai_models list (repeatable); without any --allow every
                    model is allowed
  --json            print only {\"embeddings\": [[...]], \"usage\": {\"prompt_token_count\": n}}
  -h, --help        this message
";

pub fn run(args: Vec<String>) -> Result<(), Failure> {
    let mut p = Parser::new(args, USAGE);
    let mut model = None;
    let mut registry = DEFAULT_REGISTRY.to_string();
    let mut allow: Vec<String> = Vec::new();
    let mut json = false;
    let mut texts: Vec<String> = Vec::new();
    while let Some(arg) = p.next_arg() {
        match arg {
            Arg::Positional(a) => texts.push(a),
            Arg::Flag(f, v) => match f.as_str() {
                "--help" => return Err(Failure::Help(USAGE)),
                "--model" => model = Some(p.value(&f, v)?),
                "--registry" => registry = p.value(&f, v)?,
                "--allow" => allow.push(p.value(&f, v)?),
                "--json" => {
                    p.no_flag_value(&f, &v)?;
                    json = true
                }
                _ => return Err(p.unknown(&f)),
            },
        }
    }
    let model = model.ok_or_else(|| p.usage_error("--model NAME is required"))?;
    if texts.is_empty() {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            eprintln!("spinfer: reading texts from stdin, one per line (end with Ctrl-D)");
        }
        for line in std::io::stdin().lock().lines() {
            let line =
                line.map_err(|e| Failure::Io(format!("reading texts from stdin failed: {e}")))?;
            texts.push(line);
        }
    }

    let engine = Engine::new(registry);
    let allowed = if allow.is_empty() {
        vec![model.clone()]
    } else {
        allow
    };
    let r = engine
        .component(allowed)
        .generate_embeddings(&model, &texts)?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let written = if json {
        let v = serde_json::json!({
            "embeddings": r.embeddings,
            "usage": { "prompt_token_count": r.usage.prompt_token_count },
        });
        writeln!(out, "{v}")
    } else {
        r.embeddings.iter().try_for_each(|e| {
            let line: Vec<String> = e.iter().map(|x| x.to_string()).collect();
            writeln!(out, "{}", line.join(" "))
        })
    };
    written
        .and_then(|_| out.flush())
        .map_err(|e| Failure::Io(format!("writing to stdout failed: {e}")))
}

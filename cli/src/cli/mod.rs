//! The `spinfer` command line: hand-written argument parsing and one function per subcommand
//! (`infer`, `embed`, `bench`, `serve`; a new one goes beside them with a line in [`run`]).

mod bench;
mod embed;
mod infer;
mod serve;

use std::fmt::Display;
use std::str::FromStr;

pub const USAGE: &str = "\
spinfer: run Spin's Serverless AI calls (infer, generate-embeddings) on the CPU

Usage:
  spinfer infer --model NAME [options] [PROMPT]     generate text (prompt from stdin if absent)
  spinfer chat --model NAME [options]               a conversation through the model's chat template
  spinfer embed --model NAME [options] [--] TEXT... embed texts (one per stdin line if absent)
  spinfer bench --model NAME [options]              speed beside the machine's measured limits
  spinfer serve --registry DIR [options]            Spin's remote protocol and the OpenAI API over HTTP
  spinfer help | --help                             this message

Run `spinfer <command> --help` for a command's options.
";

/// Registry used when `--registry` is not given: Spin's location under the current directory.
pub const DEFAULT_REGISTRY: &str = ".spin/ai-models";

/// Runs the command line; returns the process exit code.
/// 0: success; 1: the engine answered an error; 2: bad arguments.
pub fn run(args: Vec<String>) -> i32 {
    let mut it = args.into_iter();
    let cmd = it.next().unwrap_or_default();
    let rest: Vec<String> = it.collect();
    let outcome = match cmd.as_str() {
        "" => Err(Failure::Usage("no command given".into(), USAGE)),
        "infer" => infer::run(rest),
        "chat" => infer::run_chat(rest),
        "embed" => embed::run(rest),
        "bench" => bench::run(rest),
        "serve" => serve::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            return 0;
        }
        other => Err(Failure::Usage(format!("unknown command '{other}'"), USAGE)),
    };
    match outcome {
        Ok(()) => 0,
        Err(Failure::Help(text)) => {
            print!("{text}");
            0
        }
        Err(Failure::Usage(msg, usage)) => {
            eprintln!("error: {msg}\n");
            eprint!("{usage}");
            2
        }
        Err(Failure::Engine(e)) => {
            eprintln!("error: {e}");
            1
        }
        Err(Failure::Io(msg)) => {
            eprintln!("error: {msg}");
            1
        }
    }
}

/// Why a subcommand stopped.
pub enum Failure {
    /// `--help`: print this text to stdout and succeed.
    Help(&'static str),
    /// Bad arguments: the message and the subcommand's usage (exit 2).
    Usage(String, &'static str),
    /// The engine's Spin error (exit 1).
    Engine(spinfer::Error),
    /// Reading stdin or writing stdout failed (exit 1).
    Io(String),
}

impl From<spinfer::Error> for Failure {
    fn from(e: spinfer::Error) -> Self {
        Failure::Engine(e)
    }
}

/// One command-line item: `--name` (with `--name=value` split off), or a positional argument.
pub enum Arg {
    Flag(String, Option<String>),
    Positional(String),
}

/// Walks the arguments of one subcommand. After `--` everything is positional.
pub struct Parser {
    args: std::vec::IntoIter<String>,
    only_positional: bool,
    usage: &'static str,
}

impl Parser {
    pub fn new(args: Vec<String>, usage: &'static str) -> Parser {
        Parser {
            args: args.into_iter(),
            only_positional: false,
            usage,
        }
    }

    pub fn next_arg(&mut self) -> Option<Arg> {
        let a = self.args.next()?;
        if self.only_positional {
            return Some(Arg::Positional(a));
        }
        if a == "--" {
            self.only_positional = true;
            return self.next_arg();
        }
        if a == "-h" {
            return Some(Arg::Flag("--help".into(), None));
        }
        if a.starts_with("--") {
            return Some(match a.split_once('=') {
                Some((name, value)) => Arg::Flag(name.to_string(), Some(value.to_string())),
                None => Arg::Flag(a, None),
            });
        }
        if a.starts_with('-') && a.len() > 1 {
            // No short options besides -h; a lone "-" is positional.
            return Some(Arg::Flag(a, None));
        }
        Some(Arg::Positional(a))
    }

    /// The value of `flag`: the inline `=value` or the next argument.
    pub fn value(&mut self, flag: &str, inline: Option<String>) -> Result<String, Failure> {
        match inline {
            Some(v) => Ok(v),
            None => self
                .args
                .next()
                .ok_or_else(|| self.usage_error(format!("{flag} needs a value"))),
        }
    }

    /// The value of `flag` parsed as `T`; `what` describes the expected form.
    pub fn parsed<T: FromStr>(
        &mut self,
        flag: &str,
        inline: Option<String>,
        what: &str,
    ) -> Result<T, Failure> {
        let v = self.value(flag, inline)?;
        v.parse().map_err(|_| {
            self.usage_error(format!("invalid value '{v}' for {flag}: expected {what}"))
        })
    }

    pub fn usage_error(&self, msg: impl Display) -> Failure {
        Failure::Usage(msg.to_string(), self.usage)
    }

    pub fn unknown(&self, flag: &str) -> Failure {
        self.usage_error(format!("unknown option '{flag}'"))
    }

    pub fn no_flag_value(&self, flag: &str, inline: &Option<String>) -> Result<(), Failure> {
        match inline {
            Some(_) => Err(self.usage_error(format!("{flag} takes no value"))),
            None => Ok(()),
        }
    }
}

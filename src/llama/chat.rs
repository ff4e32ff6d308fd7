//! Chat templates: a model's Jinja template (GGUF `tokenizer.chat_template`, or
//! `chat_template.jinja` / `tokenizer_config.json` beside safetensors) rendered with a real
//! Jinja engine (minijinja, with Python's string methods, which real templates call), as
//! transformers' `apply_chat_template(..., add_generation_prompt=True)` does.

use crate::config::{read_json_object, Fields};
use crate::{Error, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;
use std::path::Path;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant" (templates may know others, e.g. "tool").
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The chat template beside a safetensors model: `chat_template.jinja` wins over
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
/// "default" is used), as in transformers.
pub fn template_beside(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(format!("cannot read {}: {e}", jinja.display())));
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let o = &read_json_object(&cfg)?;
    let origin = &cfg.display().to_string();
    let f = Fields { o, origin };
    if let Some(serde_json::Value::Array(list)) = o.get("chat_template") {
        let default = list.iter().find(|t| t["name"] == "default");
        return match default.and_then(|t| t["template"].as_str()) {
            Some(t) => Ok(Some(t.to_string())),
            None => Err(Error::runtime(format!(
                "{origin}: chat_template is a list without a \"default\" template"
            ))),
        };
    }
    Ok(f.str_opt("chat_template")?.map(str::to_string))
}

/// The prompt text of `messages` through `template`, ending with the assistant's turn opened
/// (`add_generation_prompt`). `bos` / `eos` are the tokens' texts, which templates may print.
pub fn render(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // transformers gives templates `raise_exception(msg)` to reject a conversation.
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    let bad = |e: minijinja::Error| {
        // A template's own raise_exception is about the conversation; anything else about the
        // template.
        match e.kind() {
            ErrorKind::InvalidOperation => Error::invalid(format!(
                "the model's chat template rejected the messages: {}",
                e.detail().unwrap_or("no reason given")
            )),
            _ => Error::runtime(format!("the model's chat template failed: {e}")),
        }
    };
    let tmpl = env.template_from_str(template).map_err(bad)?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_are_named() {
        let m = [ChatMessage::new("user", "hi")];
        let e = render("{{ raise_exception('no system role') }}", &m, "", "").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(s) if s.contains("no system role")),
            "{e}"
        );
        let e = render("{% for %}", &m, "", "").unwrap_err();
        assert!(e.to_string().contains("chat template failed"), "{e}");
    }
}

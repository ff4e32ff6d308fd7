//! Reading model configuration: typed fields of a JSON object (config.json and friends), each
//! wrong type an error naming the file and the key, never silently ignored. Llama and BERT
//! configs both read through it.

use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// A JSON file's top-level object.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read {}: {e}", path.display())))?;
    parse_json_object(&text, &path.display().to_string())
}

/// `text` parsed as a JSON object; `origin` names it in errors.
pub(crate) fn parse_json_object(text: &str, origin: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Error::runtime(format!("{origin}: expected a JSON object"))),
        Err(e) => Err(Error::runtime(format!("{origin} is not valid JSON: {e}"))),
    }
}

/// Typed access to a JSON object's fields with errors naming the file.
pub(crate) struct Fields<'a> {
    pub o: &'a Map<String, Value>,
    pub origin: &'a str,
}

impl<'a> Fields<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        match self.o.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    pub fn err(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::runtime(format!("{}: {key} must be {want}, found {v}", self.origin))
    }
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "a non-negative integer", v)),
        }
    }
    pub fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| Error::runtime(format!("{}: missing {key}", self.origin)))
    }
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a number", v)),
        }
    }
    pub fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?
            .ok_or_else(|| Error::runtime(format!("{}: missing {key}", self.origin)))
    }
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "true or false", v)),
        }
    }
    pub fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "a string", v)),
        }
    }
    /// A token id given as a number or a list of numbers.
    pub fn ids_opt(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.err(key, "a token id or a list of token ids", v))
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a.iter().map(one).collect::<Result<Vec<_>>>().map(Some),
            Some(v) => Ok(Some(vec![one(v)?])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_of_the_wrong_type_is_an_error_naming_file_and_key() {
        let o = &parse_json_object(
            r#"{"model_type": 5, "n": -1, "ok": "bert", "nul": null, "b": "yes"}"#,
            "cfg.json",
        )
        .unwrap();
        let f = Fields {
            o,
            origin: "cfg.json",
        };
        for e in [
            f.str_opt("model_type").unwrap_err(),
            f.usize_opt("n").unwrap_err(),
            f.bool_opt("b").unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(e.contains("cfg.json") && e.contains("must be"), "{e}");
        }
        assert_eq!(f.str_opt("ok").unwrap(), Some("bert"));
        assert_eq!(f.str_opt("nul").unwrap(), None);
        assert_eq!(f.usize_opt("absent").unwrap(), None);
        assert!(f
            .usize_req("absent")
            .unwrap_err()
            .to_string()
            .contains("missing absent"));
        assert!(parse_json_object("[1]", "x.json").is_err());
    }
}

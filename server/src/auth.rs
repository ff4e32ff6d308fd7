//! Bearer tokens: from a file (one per line, optionally with the models it may use) or an
//! environment variable; compared in constant time; the scheme is case-insensitive (Spin sends
//! `bearer`, OpenAI clients `Bearer`).

use crate::http::Failure;
use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::StatusCode;

/// One accepted token and, optionally, the models it may use (like a component's `ai_models`).
#[derive(Clone)]
pub struct Token {
    pub secret: Vec<u8>,
    /// `None`: every model.
    pub models: Option<Vec<String>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Token {{ models: {:?} }}", self.models)
    }
}

/// Parses a token file: one token per line, then optionally whitespace and a comma-separated
/// model list (`TOKEN model-a,model-b`); blank lines and lines starting with `#` are skipped.
pub fn parse_token_file(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let secret = parts.next().unwrap_or_default();
        let models = parts.next().map(|m| {
            m.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        });
        if parts.next().is_some() {
            return Err(format!(
                "line {}: expected 'TOKEN [model,model,...]', found more fields",
                i + 1
            ));
        }
        tokens.push(Token {
            secret: secret.as_bytes().to_vec(),
            models,
        });
    }
    Ok(tokens)
}

/// Which models the caller may use: `None` = all.
pub type Allowed = Option<Vec<String>>;

/// Checks the `authorization` header against `tokens` (none configured: everyone may call).
pub fn check(tokens: &[Token], headers: &HeaderMap) -> Result<Allowed, Failure> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let unauthorized = |msg: &str| {
        Failure::new(StatusCode::UNAUTHORIZED, "invalid-input", msg.to_string())
            .with_openai("authentication_error", "invalid_api_key")
    };
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing authorization header (expected: bearer <token>)"))?;
    let value = value.as_bytes();
    let given = match value.iter().position(|&b| b == b' ') {
        Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => value[i + 1..].trim_ascii(),
        _ => return Err(unauthorized("authorization must be 'bearer <token>'")),
    };
    // Every token is compared, in time that depends only on the given token's length.
    let mut found: Option<&Token> = None;
    for t in tokens {
        if ct_eq(given, &t.secret) && found.is_none() {
            found = Some(t);
        }
    }
    match found {
        Some(t) => Ok(t.models.clone()),
        None => Err(unauthorized("invalid token")),
    }
}

/// Constant-time equality: the loop runs over all of `given` whatever `secret` holds.
fn ct_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = (given.len() != secret.len()) as u8;
    for (i, &g) in given.iter().enumerate() {
        let s = secret.get(i).copied().unwrap_or(!g);
        diff |= g ^ s;
    }
    std::hint::black_box(diff) == 0
}

/// Spin's `ai_models` check (contract §3), with its exact message; 403.
pub fn check_model(allowed: &Allowed, model: &str) -> Result<(), Failure> {
    match allowed {
        Some(list) if !list.iter().any(|m| m == model) => Err(Failure::new(
            StatusCode::FORBIDDEN,
            "invalid-input",
            format!(
                "The component does not have access to use '{model}'. To give the component \
                 access, add '{model}' to the 'ai_models' key for the component in your \
                 spin.toml manifest"
            ),
        )
        .with_openai("permission_error", "model_not_allowed")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_and_comparison() {
        let t = parse_token_file("# ops\nabc\n\nxyz m1,m2\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].models, None);
        assert_eq!(
            t[1].models.as_deref(),
            Some(&["m1".to_string(), "m2".into()][..])
        );
        assert!(parse_token_file("a b c").is_err());
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"ab", b"abc"));
        assert!(!ct_eq(b"abcd", b"abc"));
        assert!(!ct_eq(b"", b"abc"));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "bearer xyz".parse().unwrap());
        assert_eq!(check(&t, &h).unwrap(), t[1].models);
        h.insert(AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(check(&t, &h).unwrap(), None);
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(check(&t, &h).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }
}

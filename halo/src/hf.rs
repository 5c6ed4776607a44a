//! Does a model need a Hugging Face token? Asked of the Hub's model API (`HF_ENDPOINT`, as
//! `huggingface_hub` does), not guessed from the model's name.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::run_bounded_input;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const CHECK_LIMIT: Duration = Duration::from_secs(20);

/// What the Hub said about a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// Public and not gated.
    Open,
    /// Gated (`"auto"` or `"manual"` approval): downloads need a token with access.
    Gated(String),
    /// Visible only with a token (or misspelled): HTTP 401/403/404.
    Denied(u16),
    /// The question could not be asked (offline, no curl, other HTTP answers).
    Unknown(String),
}

/// A Hugging Face id looks like `org/name` (or a bare legacy `name`); anything that exists
/// locally is a path.
pub fn is_hub_id(model: &str) -> bool {
    !Path::new(model).exists()
        && !model.starts_with(['/', '.', '~'])
        && model.split('/').count() <= 2
        && model.split('/').all(|p| !p.is_empty())
}

pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// `GET {endpoint}/api/models/{model}` through curl; the token, if any, goes in a header read
/// from curl's stdin (`-H @-`), so it is on no command line.
pub fn check(model: &str, token: Option<&str>) -> Access {
    let url = format!("{}/api/models/{model}", endpoint());
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--connect-timeout",
        "5",
        "--max-time",
        "15",
        "-w",
        "\n%{http_code}",
    ]);
    let header = token.map(|t| format!("Authorization: Bearer {t}\n"));
    if header.is_some() {
        cmd.args(["-H", "@-"]);
    }
    cmd.arg(&url);
    let out = match run_bounded_input(&mut cmd, CHECK_LIMIT, header.as_deref()) {
        Ok(out) => out,
        Err(e) => return Access::Unknown(format!("{e:#}")),
    };
    if !out.success {
        let why = out.stderr.trim();
        return Access::Unknown(format!(
            "{url}: {}",
            if why.is_empty() { "curl failed" } else { why }
        ));
    }
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .unwrap_or(("", out.stdout.as_str()));
    let code: u16 = code.trim().parse().unwrap_or(0);
    match code {
        200 => gated_field(body),
        401 | 403 | 404 => Access::Denied(code),
        _ => Access::Unknown(format!("{url} answered HTTP {code}")),
    }
}

fn gated_field(body: &str) -> Access {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(body) else {
        return Access::Unknown("the Hub's answer is not JSON".into());
    };
    match &json["gated"] {
        serde_json::Value::Bool(false) | serde_json::Value::Null => Access::Open,
        serde_json::Value::String(s) => Access::Gated(s.clone()),
        other => Access::Gated(other.to_string()),
    }
}

/// The warning to print (if any) for `model` with or without a token.
pub fn warning(model: &str, token: Option<&str>) -> Option<String> {
    if !is_hub_id(model) {
        return None;
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0") {
        return token.is_none().then(|| {
            format!("HF_HUB_OFFLINE is set: not asking Hugging Face whether {model} needs HF_TOKEN")
        });
    }
    let fails = "downloading its weights will fail on every node that does not have them cached";
    match (check(model, token), token) {
        (Access::Open, _) => None,
        (Access::Gated(_), Some(_)) => None,
        (Access::Gated(how), None) => Some(format!(
            "{model} is gated on Hugging Face ({how} approval) and HF_TOKEN is not set: {fails}. \
             Accept its licence at {}/{model}, then `export HF_TOKEN=hf_...` before `halo serve` \
             (halo forwards it to every node).",
            endpoint()
        )),
        (Access::Denied(code), None) => Some(format!(
            "Hugging Face does not show {model} without a token (HTTP {code}): it is private, \
             gated or misspelled, and HF_TOKEN is not set; {fails}"
        )),
        (Access::Denied(code), Some(_)) => Some(format!(
            "Hugging Face does not show {model} even with HF_TOKEN (HTTP {code}): the token lacks \
             access to it or the name is misspelled; {fails}"
        )),
        (Access::Unknown(why), None) => Some(format!(
            "could not ask Hugging Face whether {model} needs a token ({why}); HF_TOKEN is not set, \
             so if it is gated or private, {fails}"
        )),
        (Access::Unknown(_), Some(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gated_values() {
        assert_eq!(gated_field(r#"{"id":"a/b","gated":false}"#), Access::Open);
        assert_eq!(
            gated_field(r#"{"id":"a/b","gated":"manual"}"#),
            Access::Gated("manual".into())
        );
        assert_eq!(
            gated_field(r#"{"id":"a/b","gated":"auto"}"#),
            Access::Gated("auto".into())
        );
        assert!(matches!(gated_field("<html>"), Access::Unknown(_)));
    }

    #[test]
    fn hub_ids_and_paths() {
        assert!(is_hub_id("google/gemma-2-27b-it"));
        assert!(!is_hub_id("/models/llama"));
        assert!(!is_hub_id("./llama"));
        assert!(is_hub_id("gpt2"));
        assert!(!is_hub_id("a/b/c"));
    }
}

//! The one error type of Weir's config contracts ([`crate::proxy`], [`crate::coordinator`]):
//! which field is wrong and why, the field named by its JSON path.

/// A field of a config that fails to parse or validate, named by its JSON path (or, when the
/// text is not JSON of the right shape, by line and column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// JSON path of the field (`outbound[0].timeoutMs`), or `line L column C`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Parses a config file's text, naming the place of a syntax or shape error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|e| ConfigError {
        field: format!("line {} column {}", e.line(), e.column()),
        message: e.to_string(),
    })
}

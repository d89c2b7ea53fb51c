//! JSON Schema (draft 2020-12) validation of event bodies, compiled once per config load.

use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

/// Most errors reported for one event.
pub const MAX_ERRORS: usize = 20;

/// One validation failure: `path` is a JSON pointer into the event (`""` for the whole event).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

/// A queue's schema that does not compile (the config naming it is refused).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON Schema: {0}")]
pub struct InvalidSchema(pub String);

/// A compiled schema; `None` accepts any JSON.
#[derive(Clone, Default)]
pub struct Schema(Option<Arc<jsonschema::Validator>>);

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Schema(..)"
        } else {
            "Schema(any)"
        })
    }
}

impl Schema {
    pub fn compile(schema: Option<&Value>) -> Result<Self, InvalidSchema> {
        match schema {
            None => Ok(Schema(None)),
            Some(s) => jsonschema::draft202012::new(s)
                .map(|v| Schema(Some(Arc::new(v))))
                .map_err(|e| InvalidSchema(e.to_string())),
        }
    }

    /// Whether this accepts any JSON (the queue declares no schema).
    pub fn accepts_any(&self) -> bool {
        self.0.is_none()
    }

    /// Parses `body` as JSON and validates it. A body that is not JSON yields one error at `""`.
    pub fn check(&self, body: &[u8]) -> Result<Value, Vec<SchemaError>> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            vec![SchemaError {
                path: String::new(),
                message: format!("not valid JSON: {e}"),
            }]
        })?;
        self.validate(&value)?;
        Ok(value)
    }

    pub fn validate(&self, value: &Value) -> Result<(), Vec<SchemaError>> {
        let Some(v) = &self.0 else { return Ok(()) };
        if v.is_valid(value) {
            return Ok(());
        }
        Err(v
            .iter_errors(value)
            .take(MAX_ERRORS)
            .map(|e| SchemaError {
                path: e.instance_path().as_str().to_string(),
                message: e.to_string(),
            })
            .collect())
    }
}

/// `path: message; ...`, for a dead letter's `Weir-Last-Error`.
pub fn summarize(errors: &[SchemaError]) -> String {
    errors
        .iter()
        .map(|e| {
            if e.path.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.path, e.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_paths_and_accepts_valid() {
        let s = Schema::compile(Some(&json!({
            "type": "object",
            "required": ["id", "amount"],
            "properties": {"id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}}
        })))
        .unwrap();
        assert!(s.check(br#"{"id":"a","amount":3}"#).is_ok());
        let errs = s.check(br#"{"id":1,"amount":-1}"#).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"/id") && paths.contains(&"/amount"),
            "{errs:?}"
        );
        let errs = s.check(b"not json").unwrap_err();
        assert_eq!(errs[0].path, "");
        assert!(Schema::compile(Some(&json!({"type": 12}))).is_err());
        assert!(Schema::compile(None).unwrap().check(b"[1]").is_ok());
        assert!(Schema::compile(None).unwrap().accepts_any());
        assert!(!s.accepts_any());
    }
}

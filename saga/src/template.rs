//! `{{input.x}}` and `{{steps.<name>.result.y}}` in step bodies.
//!
//! A string that is exactly one template becomes the referenced JSON value (a number stays a
//! number); templates inside a longer string are replaced by the value's text. A path to nothing
//! (an optional input field, the result of a step that has none) gives `null` (empty inside a
//! string); a template that is not `input.…` or `steps.<name>.result…`, or is not closed, is an
//! error (the call is not made and the step fails).

use serde_json::Value;
use std::collections::BTreeMap;

/// What templates can see: the instance's input and each succeeded step's result.
pub struct Scope<'a> {
    pub input: &'a Value,
    pub results: &'a BTreeMap<String, Value>,
}

pub fn render(body: &Value, scope: &Scope<'_>) -> Result<Value, String> {
    Ok(match body {
        Value::String(s) => render_str(s, scope)?,
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| render(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn render_str(s: &str, scope: &Scope<'_>) -> Result<Value, String> {
    let trimmed = s.trim();
    if let Some(inner) = whole(trimmed) {
        return lookup(inner, scope).cloned();
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed template in {s:?}"))?;
        let v = lookup(after[..end].trim(), scope)?;
        match v {
            Value::Null => {}
            Value::String(t) => out.push_str(t),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// `{{ path }}` with nothing around it.
fn whole(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then(|| inner.trim())
}

static NULL: Value = Value::Null;

fn lookup<'a>(path: &str, scope: &Scope<'a>) -> Result<&'a Value, String> {
    let mut parts = path.split('.');
    let (root, rest): (&Value, Vec<&str>) = match parts.next() {
        Some("input") => (scope.input, parts.collect()),
        Some("steps") => {
            let step = parts
                .next()
                .ok_or_else(|| format!("{{{{{path}}}}}: expected steps.<name>.result"))?;
            if parts.next() != Some("result") {
                return Err(format!("{{{{{path}}}}}: expected steps.<name>.result"));
            }
            match scope.results.get(step) {
                Some(r) => (r, parts.collect()),
                None => return Ok(&NULL),
            }
        }
        _ => {
            return Err(format!(
                "{{{{{path}}}}}: templates start with input. or steps."
            ));
        }
    };
    let mut cur = root;
    for p in rest {
        cur = match cur {
            Value::Object(o) => o.get(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .unwrap_or(&NULL);
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_templates_keep_types_and_inner_ones_interpolate() {
        let input = json!({"order": {"id": "o-1", "qty": 3}, "items": ["a", "b"]});
        let results = BTreeMap::from([("charge".to_string(), json!({"txn": "t-9", "ok": true}))]);
        let scope = Scope {
            input: &input,
            results: &results,
        };
        let body = json!({
            "qty": "{{input.order.qty}}",
            "ref": "order {{ input.order.id }} paid by {{steps.charge.result.txn}}",
            "first": "{{input.items.0}}",
            "ok": "{{steps.charge.result.ok}}",
            "all": "{{input}}",
            "n": 5
        });
        assert_eq!(
            render(&body, &scope).unwrap(),
            json!({"qty": 3, "ref": "order o-1 paid by t-9", "first": "a", "ok": true, "all": input, "n": 5})
        );
    }

    #[test]
    fn missing_values_are_null_and_malformed_templates_errors() {
        let input = json!({});
        let results = BTreeMap::new();
        let scope = Scope {
            input: &input,
            results: &results,
        };
        assert_eq!(render(&json!("{{input.x}}"), &scope).unwrap(), Value::Null);
        assert_eq!(
            render(&json!("{{steps.a.result.y}}"), &scope).unwrap(),
            Value::Null
        );
        assert_eq!(
            render(&json!("id={{input.x}}"), &scope).unwrap(),
            json!("id=")
        );
        for bad in ["{{env.HOME}}", "a {{input", "{{steps.a}}"] {
            assert!(render(&json!(bad), &scope).is_err(), "{bad}");
        }
    }
}

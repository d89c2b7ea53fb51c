//! Typos inside every block of Weir's objects, for the suites that check the API server (or
//! kubectl in front of it) refuses them.
//!
//! A typo in an optional block (`retry: {attemps: 5}`) once went through `kubectl apply`, was
//! pruned, and left the defaults in force without a word. The cases come from the base objects
//! of `tests/apiserver/objects.yaml`, which set every field of every kind: each JSON object
//! in a `spec` whose schema declares properties gets one unknown key, made from one of its own
//! keys by dropping the last letter (`attempts` → `attempt`), the way a hand slips.

use anyhow::{Context as _, Result};
use serde_json::Value;
use std::path::Path;

/// One base object with one unknown key added somewhere in its `spec`.
pub struct Typo {
    /// `Microservice/orders`.
    pub object_name: String,
    /// The object with the typo.
    pub object: Value,
    /// Full path of the unknown field: `spec.dependencies[0].retry.attempt`.
    pub field: String,
    /// The unknown key alone: `attempt`.
    pub key: String,
}

/// The YAML documents of a file, in order.
pub fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Every typo case over `objects`, given the CRDs (`charts/weir/crds/*.yaml`, as JSON).
pub fn cases(crds: &[Value], objects: &[Value]) -> Vec<Typo> {
    let mut out = Vec::new();
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let Some(crd) = crds.iter().find(|c| c["spec"]["names"]["kind"] == kind) else {
            continue;
        };
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let name = format!(
            "{kind}/{}",
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        let mut paths = Vec::new();
        blocks(&object["spec"], schema, "/spec", "spec", &mut paths);
        for (pointer, field_path, key) in paths {
            let mut object = object.clone();
            if let Some(Value::Object(map)) = object.pointer_mut(&pointer) {
                map.insert(key.clone(), Value::from(1));
            }
            out.push(Typo {
                object_name: name.clone(),
                object,
                field: format!("{field_path}.{key}"),
                key,
            });
        }
    }
    out
}

/// Collects (JSON pointer, field path, typo key) for `v` and every object below it.
fn blocks(
    v: &Value,
    schema: &Value,
    pointer: &str,
    path: &str,
    out: &mut Vec<(String, String, String)>,
) {
    match v {
        Value::Object(map) => {
            let Some(props) = schema["properties"].as_object() else {
                return; // free-form JSON (a message schema, a saga body): any key is allowed
            };
            if let Some(key) = map.keys().find_map(|k| typo_of(k, props)) {
                out.push((pointer.to_string(), path.to_string(), key));
            }
            for (k, child) in map {
                if let Some(s) = props.get(k) {
                    blocks(
                        child,
                        s,
                        &format!("{pointer}/{k}"),
                        &format!("{path}.{k}"),
                        out,
                    );
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                blocks(
                    item,
                    &schema["items"],
                    &format!("{pointer}/{i}"),
                    &format!("{path}[{i}]"),
                    out,
                );
            }
        }
        _ => {}
    }
}

/// `key` without its last letter, unless that is empty or a declared field.
fn typo_of(key: &str, props: &serde_json::Map<String, Value>) -> Option<String> {
    let t = &key[..key.len().checked_sub(1)?];
    (t.len() > 1 && !props.contains_key(t)).then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_typo_per_block_with_its_full_path() {
        let crd = json!({"spec": {"names": {"kind": "Microservice"}, "versions": [{"schema": {"openAPIV3Schema": {"properties": {"spec": {
            "properties": {
                "port": {"type": "integer"},
                "dependencies": {"type": "array", "items": {"properties": {
                    "name": {"type": "string"},
                    "retry": {"properties": {"attempts": {"type": "integer"}}}
                }}},
                "body": {"x-kubernetes-preserve-unknown-fields": true}
            }
        }}}}}]}});
        let ms = json!({"kind": "Microservice", "metadata": {"name": "orders"}, "spec": {
            "port": 8080,
            "dependencies": [{"name": "users", "retry": {"attempts": 2}}],
            "body": {"anything": 1}
        }});
        let cases = cases(&[crd], &[ms]);
        let fields: Vec<&str> = cases.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.bod",
                "spec.dependencies[0].nam",
                "spec.dependencies[0].retry.attempt"
            ]
        );
        let last = &cases[2];
        assert_eq!(
            last.object["spec"]["dependencies"][0]["retry"]["attempt"],
            1
        );
        assert_eq!(
            last.object["spec"]["dependencies"][0]["retry"]["attempts"],
            2
        );
        assert_eq!(last.object_name, "Microservice/orders");
    }
}

//! The CustomResourceDefinitions, generated from the Rust types.

use crate::{Broker, Microservice, Queue, Saga};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

/// Every Weir CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        Microservice::crd(),
        Queue::crd(),
        Saga::crd(),
        Broker::crd(),
    ];
    for crd in &mut crds {
        let kind = crd.spec.names.kind.clone();
        for v in &mut crd.spec.versions {
            if let Some(s) = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                if kind == "Microservice" {
                    name_is_a_dns_label(s);
                }
                visit(s, &mut |s| {
                    bound_duration(s);
                    drop_unknown_format(s);
                    not_nullable(s);
                });
            }
        }
    }
    crds
}

/// A Microservice's name names its Service and, with `-weir-endpoints`, its headless Service,
/// so it must be a DNS label short enough for both. The schema says so on
/// `metadata.name` itself (the one place besides `generateName` where a CRD may restrict
/// metadata; `metadata` may carry nothing else, not even a description), rather than in a CEL
/// rule on the root: the apiserver names the field in its
/// answer (`metadata.name: Invalid value`), where a root rule is reported against no field.
fn name_is_a_dns_label(root: &mut JSONSchemaProps) {
    let name = JSONSchemaProps {
        type_: Some("string".into()),
        max_length: Some(crate::microservice::MAX_NAME_LEN as i64),
        pattern: Some(crate::validate::DNS_LABEL_PATTERN.into()),
        description: Some(crate::validate::MICROSERVICE_NAME_RULE.into()),
        ..Default::default()
    };
    let metadata = JSONSchemaProps {
        type_: Some("object".into()),
        properties: Some([("name".to_string(), name)].into()),
        ..Default::default()
    };
    root.properties
        .get_or_insert_with(Default::default)
        .insert("metadata".into(), metadata);
}

/// Calls `f` on `s` and on every schema nested in it (properties, items, map values).
fn visit(s: &mut JSONSchemaProps, f: &mut impl FnMut(&mut JSONSchemaProps)) {
    f(s);
    for p in s.properties.iter_mut().flat_map(|m| m.values_mut()) {
        visit(p, f);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = s.items.as_mut() {
        visit(items, f);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = s.additional_properties.as_mut() {
        visit(values, f);
    }
}

/// Optional fields are left out when unset, never sent as `null`, so no field is `nullable`.
/// It matters beyond tidiness: when the apiserver publishes a CRD's schema as OpenAPI v2 (what
/// `kubectl explain` and kubectl's client-side validation read before OpenAPI v3), it strips
/// the type and properties of every nullable field, so a typo inside an optional block such as
/// `retry: {attemps: 5}` went unseen and was pruned. A `null` sent anyway is pruned by the
/// apiserver like an absent field. For the same reason an optional enum (schemars writes
/// `enum: [..., null]` for `Option<SomeEnum>`) loses its `null`: an API server of 1.20 refuses
/// the whole CRD for it (with a misleading `per-version schemas may not all be set to
/// identical values`), and on any server it would let nothing through that absence does not.
fn not_nullable(s: &mut JSONSchemaProps) {
    s.nullable = None;
    if let Some(values) = s.enum_.as_mut() {
        values.retain(|v| !v.0.is_null());
    }
}

/// Formats the apiserver knows (k8s.io/kube-openapi `strfmt` and the OpenAPI number formats).
/// Any other (schemars writes `uint16`, `uint32`, `uint64` for unsigned integers) makes the
/// apiserver warn `unrecognized format` on every apply, and it checks nothing: the bounds
/// schemars also writes (`minimum: 0`, `maximum: 65535`) do the checking.
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "datetime",
    "duration",
    "password",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "bsonobjectid",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
];

fn drop_unknown_format(s: &mut JSONSchemaProps) {
    if s.format
        .as_deref()
        .is_some_and(|f| !KNOWN_FORMATS.contains(&f))
    {
        s.format = None;
    }
}

/// The CRDs as an API server of version 1.`minor` accepts them. CEL rules
/// (`x-kubernetes-validations`) exist from 1.25 and their `fieldPath` from 1.28; a server-side
/// apply to an older server refuses fields it does not know, so they are left out (the operator
/// checks the same rules itself and reports violations in status).
pub fn all_for_server(minor: u32) -> Vec<CustomResourceDefinition> {
    let mut crds = all();
    for crd in &mut crds {
        for v in &mut crd.spec.versions {
            if let Some(s) = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                visit(s, &mut |s| downgrade(s, minor));
            }
        }
    }
    crds
}

fn downgrade(s: &mut JSONSchemaProps, minor: u32) {
    if minor < 25 {
        s.x_kubernetes_validations = None;
    } else if minor < 28 {
        for rule in s.x_kubernetes_validations.iter_mut().flatten() {
            rule.field_path = None;
            rule.reason = None;
        }
    }
}

/// Duration strings get a maximum length: the apiserver bounds the cost of CEL rules (such as
/// `duration(self.max) >= duration(self.base)`) by the longest string a field may hold.
fn bound_duration(s: &mut JSONSchemaProps) {
    if s.pattern.as_deref() == Some(crate::duration::DURATION_PATTERN) {
        s.max_length = Some(32);
    }
}

/// File name of a CRD under `charts/weir/crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML document of one CRD, as committed under `charts/weir/crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_json::to_value(crd).expect("a CRD always serializes");
    format!(
        "# Generated by `weir crd` from crds/src; do not edit.\n{}",
        yaml_of(&body)
    )
}

/// All CRDs as one multi-document YAML stream (what `weir crd` prints).
pub fn all_yaml() -> String {
    all().iter().map(to_yaml).collect::<Vec<_>>().join("---\n")
}

fn yaml_of(v: &serde_json::Value) -> String {
    // serde_json -> YAML without an extra dependency in the public API: the operator crate
    // and tests use serde_yaml; here a minimal emitter keeps this crate light.
    let mut out = String::new();
    emit(v, 0, &mut out, false);
    out
}

fn emit(v: &serde_json::Value, indent: usize, out: &mut String, in_list: bool) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) if !map.is_empty() => {
            let mut first = true;
            for (k, val) in map {
                if !(first && in_list) {
                    out.push_str(&pad);
                }
                first = false;
                out.push_str(&scalar_key(k));
                out.push(':');
                match val {
                    Value::Object(m) if !m.is_empty() => {
                        out.push('\n');
                        emit(val, indent + 2, out, false);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        emit(val, indent, out, false);
                    }
                    _ => {
                        out.push(' ');
                        out.push_str(&scalar(val));
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                match item {
                    Value::Object(m) if !m.is_empty() => emit(item, indent + 2, out, true),
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        emit(item, indent + 2, out, false);
                    }
                    _ => {
                        out.push_str(&scalar(item));
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn scalar_key(k: &str) -> String {
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !k.is_empty()
    {
        k.to_string()
    } else {
        serde_json::to_string(k).expect("string")
    }
}

fn scalar(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        // JSON strings are valid YAML double-quoted scalars.
        Value::String(s) => serde_json::to_string(s).expect("string"),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_round_trips_to_the_same_crds() {
        for crd in all() {
            let text = to_yaml(&crd);
            let back: serde_json::Value = serde_yaml::from_str(&text).unwrap();
            assert_eq!(
                back,
                serde_json::to_value(&crd).unwrap(),
                "{}",
                file_name(&crd)
            );
        }
    }

    /// What `kubectl explain` shows and kubectl's client-side validation checks: every field
    /// has a type (or is free-form JSON on purpose) and a description, no field is nullable
    /// (the apiserver would publish it without type and properties), and each kind says what
    /// it is.
    #[test]
    fn every_field_has_a_type_and_a_description() {
        fn walk(s: &JSONSchemaProps, at: &str, bad: &mut Vec<String>) {
            let free_form = s.x_kubernetes_preserve_unknown_fields == Some(true)
                || s.x_kubernetes_int_or_string == Some(true);
            if s.type_.is_none() && !free_form {
                bad.push(format!("{at}: no type"));
            }
            if s.nullable.is_some() {
                bad.push(format!("{at}: nullable"));
            }
            if s.type_.as_deref() == Some("object")
                && s.properties.is_none()
                && s.additional_properties.is_none()
                && !free_form
            {
                bad.push(format!("{at}: an object without properties"));
            }
            for (k, p) in s.properties.iter().flatten() {
                let path = format!("{at}.{k}");
                // The apiserver refuses anything on `metadata` but its `name` and
                // `generateName` (the type it allows): the standard description applies.
                if path.ends_with("Microservice.metadata") {
                    continue;
                }
                if p.description.as_deref().is_none_or(|d| d.trim().is_empty()) {
                    bad.push(format!("{path}: no description"));
                }
                walk(p, &path, bad);
            }
            if let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items {
                walk(items, &format!("{at}[]"), bad);
            }
            if let Some(JSONSchemaPropsOrBool::Schema(values)) = &s.additional_properties {
                walk(values, &format!("{at}{{}}"), bad);
            }
        }
        let mut bad = Vec::new();
        for crd in all() {
            let kind = &crd.spec.names.kind;
            for v in &crd.spec.versions {
                let root = v
                    .schema
                    .as_ref()
                    .unwrap()
                    .open_api_v3_schema
                    .as_ref()
                    .unwrap();
                let d = root.description.as_deref().unwrap_or_default();
                if d.is_empty() || d.contains("Auto-generated") || d.contains("derived type") {
                    bad.push(format!("{kind}: kind description {d:?}"));
                }
                walk(root, kind, &mut bad);
            }
        }
        assert!(
            bad.is_empty(),
            "{} problems:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn no_field_is_nullable_and_no_enum_holds_null() {
        // 1.20 refuses a CRD with `null` in an enum; kubectl explain loses nullable fields.
        let mut bad = Vec::new();
        for mut crd in all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            for v in &mut crd.spec.versions {
                let root = v
                    .schema
                    .as_mut()
                    .and_then(|s| s.open_api_v3_schema.as_mut());
                visit(root.expect("a schema"), &mut |s| {
                    if s.nullable.is_some() || s.enum_.iter().flatten().any(|v| v.0.is_null()) {
                        bad.push(format!("{name}: {:?}", s.description));
                    }
                });
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }

    #[test]
    fn old_servers_get_crds_without_cel() {
        let text = |crds: Vec<CustomResourceDefinition>| serde_json::to_string(&crds).unwrap();
        assert!(text(all()).contains("x-kubernetes-validations"));
        assert!(text(all()).contains(r#""fieldPath":"."#));
        assert!(!text(all_for_server(20)).contains("x-kubernetes-validations"));
        let v127 = text(all_for_server(27));
        assert!(v127.contains("x-kubernetes-validations") && !v127.contains(r#""fieldPath":"."#));
        assert_eq!(text(all_for_server(33)), text(all()));
    }

    #[test]
    fn crds_carry_names_columns_and_categories() {
        let ms = Microservice::crd();
        assert_eq!(
            ms.spec.names.short_names.as_deref(),
            Some(&["ms".to_string()][..])
        );
        assert_eq!(
            ms.spec.names.categories.as_deref(),
            Some(&["weir".to_string()][..])
        );
        let cols: Vec<_> = ms.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Ready", "Replicas", "Dependencies", "Reason", "Age"]);
        assert!(
            ms.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
    }
}

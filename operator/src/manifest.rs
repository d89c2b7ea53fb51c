//! Reading Weir resources from files: YAML documents, validated against the generated CRD
//! schema (types, ranges, patterns, unknown fields), then against the rules the schema's CEL
//! expressions state, then across objects. Every error names the file, the object and the field.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use weir_crds::{Broker, Microservice, Queue, Saga, validate};

/// One Weir object read from a file.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "a handful per manifest, moved once: boxing buys nothing"
)]
pub enum Object {
    Microservice(Microservice),
    Queue(Queue),
    Saga(Saga),
    Broker(Broker),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Microservice(_) => "Microservice",
            Object::Queue(_) => "Queue",
            Object::Saga(_) => "Saga",
            Object::Broker(_) => "Broker",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    pub object: Object,
}

/// An input error, named by where it is: file, object and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Microservice/orders`, or `document 2` when the document has no kind/name yet.
    pub object: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.object,
                self.message
            )
        } else {
            write!(
                f,
                "{}: {}: {}: {}",
                self.file.display(),
                self.object,
                self.field,
                self.message
            )
        }
    }
}

/// Files named on the command line: each file as given, each directory's `*.yaml`/`*.yml`
/// files recursively in name order.
pub fn expand_paths(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)?.collect::<Result<Vec<_>, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            let mut files = Vec::new();
            let mut dirs = Vec::new();
            for e in entries {
                let path = e.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if matches!(
                    path.extension().and_then(|x| x.to_str()),
                    Some("yaml" | "yml")
                ) {
                    files.push(path);
                }
            }
            out.extend(files);
            out.extend(expand_paths(&dirs)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Validators for each kind's schema, built once from the generated CRDs.
pub struct Schemas {
    by_kind: BTreeMap<String, jsonschema::Validator>,
}

impl Default for Schemas {
    fn default() -> Self {
        Self::new()
    }
}

impl Schemas {
    pub fn new() -> Self {
        let mut by_kind = BTreeMap::new();
        for crd in weir_crds::crd::all() {
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("every Weir CRD has a schema");
            let mut schema = serde_json::to_value(schema).expect("schema serializes");
            // The root lists only spec and status; apiVersion, kind and metadata are the apiserver's.
            // metadata is the apiserver's: the schema restricts only its name.
            if let Some(Value::Object(props)) = schema.get_mut("properties") {
                props
                    .iter_mut()
                    .filter(|(k, _)| *k != "metadata")
                    .for_each(|(_, v)| close_objects(v));
            }
            let validator =
                jsonschema::draft4::new(&schema).expect("generated CRD schema compiles");
            by_kind.insert(crd.spec.names.kind.clone(), validator);
        }
        Self { by_kind }
    }

    /// Schema errors of one object as `(field, message)`, field in `spec.a[0].b` form.
    pub fn check(&self, kind: &str, value: &Value) -> Vec<(String, String)> {
        let Some(v) = self.by_kind.get(kind) else {
            return vec![];
        };
        let mut errs: Vec<_> = v.iter_errors(value).flat_map(named).collect();
        errs.sort();
        errs.dedup();
        errs
    }
}

/// One schema error as `(field, message)`. A missing or unknown property is named by its own
/// path (`spec.dependencies[0].name`), as the apiserver names it, not by the object holding it.
fn named(e: jsonschema::ValidationError<'_>) -> Vec<(String, String)> {
    use jsonschema::error::ValidationErrorKind;
    let at = pointer_to_field(e.instance_path().as_str());
    let child = |name: &str| {
        if at.is_empty() {
            name.to_string()
        } else {
            format!("{at}.{name}")
        }
    };
    match e.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            vec![(child(name), format!("required field {name:?} is missing"))]
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|name| {
                (
                    child(name),
                    format!("unknown field {name:?} (not in the schema)"),
                )
            })
            .collect(),
        _ => vec![(at, e.to_string())],
    }
}

/// The apiserver prunes unknown fields silently; for files we refuse them instead, so a typo
/// (`timout:`) is an error rather than a policy that quietly is not there.
fn close_objects(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserve {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        props.values_mut().for_each(close_objects);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v) = map.get_mut(key) {
            close_objects(v);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(items)) = map.get_mut(key) {
            items.iter_mut().for_each(close_objects);
        }
    }
}

/// `/spec/dependencies/0/timeout` → `spec.dependencies[0].timeout`.
pub fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Reads every Weir object in `files`. Objects of other kinds are skipped and reported in
/// the second list (so a directory may also hold, say, a ConfigMap).
pub fn load(
    files: &[PathBuf],
    schemas: &Schemas,
) -> Result<(Vec<Loaded>, Vec<String>), Vec<ManifestError>> {
    let mut loaded = Vec::new();
    let mut skipped = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => load_text(file, &text, schemas, &mut loaded, &mut skipped, &mut errors),
            Err(e) => errors.push(ManifestError {
                file: file.clone(),
                object: "file".into(),
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    errors.extend(cross_check(&loaded));
    if errors.is_empty() {
        Ok((loaded, skipped))
    } else {
        Err(errors)
    }
}

fn load_text(
    file: &Path,
    text: &str,
    schemas: &Schemas,
    loaded: &mut Vec<Loaded>,
    skipped: &mut Vec<String>,
    errors: &mut Vec<ManifestError>,
) {
    use serde::Deserialize;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_name = format!("document {}", i + 1);
        let err = |object: &str, field: &str, message: String| ManifestError {
            file: file.to_path_buf(),
            object: object.to_string(),
            field: field.to_string(),
            message,
        };
        let value = match Value::deserialize(doc) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(err(&doc_name, "", format!("not valid YAML: {e}")));
                // A syntax error leaves the rest of the stream unreadable.
                break;
            }
        };
        let text_of = |p: &str| {
            value
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind, name) = (
            text_of("/apiVersion"),
            text_of("/kind"),
            text_of("/metadata/name"),
        );
        let (api_version, kind, name) = (api_version.as_str(), kind.as_str(), name.as_str());
        let object = if kind.is_empty() || name.is_empty() {
            doc_name.clone()
        } else {
            format!("{kind}/{name}")
        };
        if api_version.is_empty() || kind.is_empty() {
            errors.push(err(&object, "", "missing apiVersion or kind".into()));
            continue;
        }
        let (group, _) = api_version.split_once('/').unwrap_or(("", api_version));
        if group != weir_crds::GROUP {
            skipped.push(format!(
                "{}: {kind}/{name} ({api_version}) is not a Weir resource",
                file.display()
            ));
            continue;
        }
        if api_version != format!("{}/{}", weir_crds::GROUP, weir_crds::VERSION) {
            errors.push(err(
                &object,
                "apiVersion",
                format!("unsupported version {api_version:?}; this weir serves weir.dev/v1alpha1"),
            ));
            continue;
        }
        if !matches!(kind, "Microservice" | "Queue" | "Saga" | "Broker") {
            errors.push(err(
                &object,
                "kind",
                format!("unknown kind {kind:?}; expected Microservice, Queue, Saga or Broker"),
            ));
            continue;
        }
        if name.is_empty() {
            errors.push(err(&object, "metadata.name", "required".into()));
            continue;
        }
        let schema_errors = schemas.check(kind, &value);
        if !schema_errors.is_empty() {
            errors.extend(schema_errors.into_iter().map(|(f, m)| err(&object, &f, m)));
            continue;
        }
        let parsed = match kind {
            "Microservice" => serde_json::from_value(value).map(Object::Microservice),
            "Queue" => serde_json::from_value(value).map(Object::Queue),
            "Saga" => serde_json::from_value(value).map(Object::Saga),
            _ => serde_json::from_value(value).map(Object::Broker),
        };
        let object_value = match parsed {
            Ok(o) => o,
            Err(e) => {
                errors.push(err(&object, "", e.to_string()));
                continue;
            }
        };
        let rule_errors = match &object_value {
            Object::Microservice(m) => validate::microservice(name, &m.spec),
            Object::Queue(q) => validate::queue(&q.spec),
            Object::Saga(s) => validate::saga(&s.spec),
            Object::Broker(b) => validate::broker(&b.spec),
        };
        if !rule_errors.is_empty() {
            errors.extend(
                rule_errors
                    .into_iter()
                    .map(|e| err(&object, &e.field, e.message)),
            );
            continue;
        }
        loaded.push(Loaded {
            file: file.to_path_buf(),
            object: object_value,
        });
    }
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_default()
}

/// References between objects of the input: a dependency on a Microservice that is not there.
fn cross_check(loaded: &[Loaded]) -> Vec<ManifestError> {
    let services: BTreeSet<(String, String)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => Some((
                namespace_of(&m.metadata),
                m.metadata.name.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    let queues: BTreeSet<(String, String)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Queue(q) => Some((
                namespace_of(&q.metadata),
                q.metadata.name.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    let mut errors = Vec::new();
    for l in loaded {
        let Object::Microservice(m) = &l.object else {
            continue;
        };
        let ns = namespace_of(&m.metadata);
        let name = m.metadata.name.clone().unwrap_or_default();
        for (i, d) in m.spec.dependencies.iter().enumerate() {
            if let Some(target) = &d.microservice
                && !services.contains(&(ns.clone(), target.clone()))
            {
                errors.push(ManifestError {
                    file: l.file.clone(),
                    object: format!("Microservice/{name}"),
                    field: format!("spec.dependencies[{i}].microservice"),
                    message: format!(
                        "Microservice {target:?} is not in the input (same namespace)"
                    ),
                });
            }
        }
        let queue_refs = m
            .spec
            .publishes
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("spec.publishes[{i}].queue"), &p.queue))
            .chain(
                m.spec
                    .consumes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("spec.consumes[{i}].queue"), &c.queue)),
            );
        for (field, q) in queue_refs {
            if !queues.contains(&(ns.clone(), q.clone())) {
                errors.push(ManifestError {
                    file: l.file.clone(),
                    object: format!("Microservice/{name}"),
                    field,
                    message: format!("Queue {q:?} is not in the input (same namespace)"),
                });
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Vec<Loaded>, Vec<ManifestError>> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, text).unwrap();
        load(&[file], &Schemas::new()).map(|(l, _)| l)
    }

    fn fields(text: &str) -> Vec<String> {
        load_str(text)
            .unwrap_err()
            .into_iter()
            .map(|e| format!("{}|{}", e.object, e.field))
            .collect()
    }

    const HEAD: &str =
        "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: orders}\n";

    #[test]
    fn loads_a_valid_microservice() {
        let l = load_str(&format!("{HEAD}spec: {{image: orders:1}}\n")).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn wrong_type_is_named() {
        assert_eq!(
            fields(&format!("{HEAD}spec: {{image: orders:1, replicas: two}}\n")),
            ["Microservice/orders|spec.replicas"]
        );
    }

    #[test]
    fn out_of_range_is_named() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  dependencies:\n  - name: users\n    url: http://u\n    circuitBreaker: {{errorThresholdPercentage: 150}}\n"
        ));
        assert_eq!(
            f,
            ["Microservice/orders|spec.dependencies[0].circuitBreaker.errorThresholdPercentage"]
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  dependencies:\n  - name: users\n    url: http://u\n    timout: 1s\n"
        ));
        assert_eq!(f, ["Microservice/orders|spec.dependencies[0].timout"]);
        let e = load_str(&format!("{HEAD}spec:\n  image: o\n  replica: 2\n")).unwrap_err();
        assert!(e[0].message.contains("replica"), "{}", e[0]);
    }

    #[test]
    fn bad_duration_is_named() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  inbound: {{timeout: 10 seconds}}\n"
        ));
        assert_eq!(f, ["Microservice/orders|spec.inbound.timeout"]);
    }

    #[test]
    fn missing_dependency_is_named() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  dependencies:\n  - name: users\n    microservice: users\n"
        ));
        assert_eq!(f, ["Microservice/orders|spec.dependencies[0].microservice"]);
    }

    #[test]
    fn missing_queue_is_named() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  publishes: [{{queue: audit}}]\n  consumes: [{{queue: orders, path: /e}}]\n---\napiVersion: weir.dev/v1alpha1\nkind: Queue\nmetadata: {{name: audit}}\nspec: {{broker: nats}}\n"
        ));
        assert_eq!(f, ["Microservice/orders|spec.consumes[0].queue"]);
    }

    #[test]
    fn cel_rules_are_checked_without_an_apiserver() {
        let f = fields(&format!(
            "{HEAD}spec:\n  image: o\n  dependencies:\n  - name: users\n    url: http://u\n    microservice: users\n"
        ));
        assert!(
            f.contains(&"Microservice/orders|spec.dependencies[0]".to_string()),
            "{f:?}"
        );
    }

    #[test]
    fn other_kinds_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cm.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .unwrap();
        let (l, skipped) = load(&[file], &Schemas::new()).unwrap();
        assert!(l.is_empty());
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn pointer_to_field_formats_indices() {
        assert_eq!(
            pointer_to_field("/spec/dependencies/0/timeout"),
            "spec.dependencies[0].timeout"
        );
        assert_eq!(pointer_to_field(""), "");
    }
}

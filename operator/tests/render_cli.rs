//! `weir render` through its real interface: the binary, files in, YAML or errors out.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from `weir render` output; rerun with UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

#[test]
fn renders_examples_hello_like_the_golden_file() {
    let out = weir(&["render", "-f", "examples/hello", "-n", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_golden("hello.yaml", &String::from_utf8(out.stdout).unwrap());
}

/// The edge example: a gateway with no app container, its Secrets mounted into the sidecar.
#[test]
fn renders_examples_edge_like_the_golden_file() {
    let out = weir(&["render", "-f", "examples/edge"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_golden("edge.yaml", &String::from_utf8(out.stdout).unwrap());
}

/// The gRPC example: an h2c Service port, the sidecar speaking HTTP/2 to its app, a gRPC
/// health probe, and a dependency policy with gRPC statuses and a gRPC fallback.
#[test]
fn renders_examples_grpc_like_the_golden_file() {
    let out = weir(&["render", "-f", "examples/grpc"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_golden("grpc.yaml", &String::from_utf8(out.stdout).unwrap());
}

#[test]
fn renders_the_legacy_sidecar_like_the_golden_file() {
    let out = weir(&[
        "render",
        "-f",
        "examples/hello/users.yaml",
        "-n",
        "demo",
        "--legacy-sidecar",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_golden("users-legacy.yaml", &String::from_utf8(out.stdout).unwrap());
}

#[test]
fn every_example_renders_and_each_microservice_gets_four_objects() {
    let out = weir(&["render", "-f", "examples/"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_yaml::Value> = text
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let kinds = |k: &str| docs.iter().filter(|d| d["kind"] == k).count();
    assert!(kinds("Deployment") >= 2);
    // Each managed Broker (the saga and shop examples have one) is a StatefulSet and a Service.
    assert_eq!(kinds("StatefulSet"), 2);
    // Each Microservice also has its headless `<name>-weir-endpoints` Service, which callers'
    // sidecars resolve; a saga coordinator (a Deployment labelled with its Saga) has none.
    let headless: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "Service" && d["spec"]["clusterIP"] == "None")
        .collect();
    let microservices: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" && d["metadata"]["labels"]["weir.dev/saga"].is_null())
        .collect();
    assert!(!microservices.is_empty());
    assert_eq!(headless.len(), microservices.len());
    for d in &microservices {
        let name = d["metadata"]["name"].as_str().unwrap();
        let service = headless
            .iter()
            .find(|s| s["metadata"]["name"] == format!("{name}-weir-endpoints").as_str())
            .unwrap_or_else(|| panic!("no headless Service for {name}"));
        assert_eq!(service["spec"]["publishNotReadyAddresses"], false);
        assert_eq!(service["spec"]["ports"][0]["port"], 15001);
        assert_eq!(
            service["spec"]["selector"],
            d["spec"]["selector"]["matchLabels"]
        );
    }
    assert_eq!(
        kinds("Deployment") + kinds("StatefulSet") + headless.len(),
        kinds("Service")
    );
    assert_eq!(kinds("Deployment"), kinds("ConfigMap"));
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let pod = &d["spec"]["template"]["spec"];
        let containers: Vec<_> = pod["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        if !containers.contains(&"app") {
            // A gateway without an app: the proxy alone, as a plain container.
            assert_eq!(containers, ["weir-proxy"]);
            assert!(pod["initContainers"].is_null());
            continue;
        }
        let init = &pod["initContainers"];
        let names: Vec<_> = init
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["weir-proxy"], "native sidecar by default");
        assert_eq!(init[0]["restartPolicy"], "Always");
    }
}

/// Each file under tests/bad/ is refused with exit 2 and a message naming file, object and field.
#[test]
fn broken_manifests_exit_2_naming_the_field() {
    let cases = [
        ("wrong-type.yaml", "Microservice/orders: spec.replicas"),
        (
            "out-of-range.yaml",
            "Microservice/orders: spec.dependencies[0].circuitBreaker.errorThresholdPercentage",
        ),
        (
            "unknown-field.yaml",
            "Microservice/orders: spec.dependencies[0]",
        ),
        (
            "missing-dependency.yaml",
            "Microservice/orders: spec.dependencies[0].microservice",
        ),
        (
            "bad-duration.yaml",
            "Microservice/orders: spec.dependencies[0].timeout",
        ),
        (
            "both-targets.yaml",
            "Microservice/orders: spec.dependencies[0]",
        ),
        (
            "edge-two-key-sources.yaml",
            "Microservice/gateway: spec.edge.jwt",
        ),
        (
            "edge-route-unknown-dependency.yaml",
            "Microservice/gateway: spec.edge.routes[0].dependency",
        ),
        (
            "autoscaling-unconsumed-queue.yaml",
            "Microservice/worker: spec.autoscaling.queueLag",
        ),
        (
            "autoscaling-twice.yaml",
            "Microservice/worker: metadata.annotations[\"weir.dev/autoscaled-by\"]",
        ),
        ("not-yaml.yaml", "document 1"),
    ];
    for (file, needle) in cases {
        let path = format!("operator/tests/bad/{file}");
        let out = weir(&["render", "-f", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}: {needle}")),
            "{file}: expected {needle:?} in:\n{stderr}"
        );
        assert!(out.stdout.is_empty(), "{file}: nothing may be rendered");
    }
}

#[test]
fn unknown_field_message_names_the_field() {
    let out = weir(&["render", "-f", "operator/tests/bad/unknown-field.yaml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("timout"));
}

/// The shop under the mesh, as the operator renders it with the chart's default: each
/// Microservice's ServiceAccount, its sidecar's identity, peers and the callers the files
/// declare (orders admitted by users; the place-order saga by catalog, payments and orders).
#[test]
fn renders_the_shop_under_the_mesh_like_the_golden_file() {
    let out = weir(&["render", "--mtls", "-f", "examples/shop", "-n", "shop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    use serde::Deserialize as _;
    let mut allowed = std::collections::BTreeMap::new();
    let mut accounts = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["kind"].as_str() {
            Some("ServiceAccount") => accounts.push(name),
            Some("ConfigMap") => {
                let config: serde_json::Value =
                    serde_json::from_str(v["data"]["proxy.json"].as_str().unwrap()).unwrap();
                allowed.insert(name, config["mtls"]["authorization"]["allow"].clone());
            }
            _ => {}
        }
    }
    let allow = |cm: &str| allowed[cm].clone();
    assert_eq!(
        allow("users-weir-proxy"),
        serde_json::json!(["shop/orders"])
    );
    assert_eq!(
        allow("orders-weir-proxy"),
        serde_json::json!(["shop/gateway", "shop/saga/place-order"])
    );
    assert_eq!(
        allow("payments-weir-proxy"),
        serde_json::json!(["shop/saga/place-order"])
    );
    assert_eq!(allow("gateway-weir-proxy"), serde_json::json!([]));
    accounts.sort();
    assert_eq!(
        accounts,
        [
            "catalog-weir",
            "gateway-weir",
            "notifications-weir",
            "orders-weir",
            "payments-weir",
            "place-order-saga-weir",
            "users-weir"
        ]
    );
    check_golden("shop-mtls.yaml", &text);
}

/// The documents of `weir render`'s output.
fn documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect()
}

fn rendered(args: &[&str]) -> String {
    let out = weir(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The autoscaling example: api under a HorizontalPodAutoscaler (CPU), worker under a KEDA
/// ScaledObject (queue lag and CPU, from zero); neither Deployment carries `replicas`.
#[test]
fn renders_examples_autoscaling_like_the_golden_file() {
    let text = rendered(&["render", "-f", "examples/autoscaling"]);
    let docs = documents(&text);
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        assert!(
            d["spec"].get("replicas").is_none(),
            "an autoscaled Deployment names no replicas: {d}"
        );
    }
    let kinds: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] != "ConfigMap" && d["kind"] != "Service")
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Deployment/api",
            "HorizontalPodAutoscaler/api",
            "Deployment/worker",
            "ScaledObject/worker"
        ]
    );
    check_golden("autoscaling.yaml", &text);
}

/// Without KEDA (`--no-keda`, as the operator renders when discovery finds no ScaledObject):
/// worker keeps its CPU target through a HorizontalPodAutoscaler, from at least one pod.
#[test]
fn without_keda_only_the_cpu_and_memory_targets_are_rendered() {
    let docs = documents(&rendered(&[
        "render",
        "-f",
        "examples/autoscaling",
        "--no-keda",
    ]));
    assert!(docs.iter().all(|d| d["kind"] != "ScaledObject"));
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler" && d["metadata"]["name"] == "worker")
        .expect("worker's HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["minReplicas"], 1, "{hpa}");
    assert_eq!(hpa["spec"]["maxReplicas"], 20);
    assert_eq!(
        hpa["spec"]["metrics"],
        serde_json::json!([{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}])
    );
}

/// Fails naming each error when KEDA's `schema` refuses the rendered `object`.
fn accepted(schema: &jsonschema::Validator, object: &serde_json::Value) {
    let errors: Vec<String> = schema
        .iter_errors(object)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "KEDA's schema refuses {}/{} in {}: {errors:?}\n{object}",
        object["kind"],
        object["metadata"]["name"],
        object["metadata"]["namespace"]
    );
}

/// KEDA 2.16's CRD schema of `kind` (operator/tests/keda/), made strict as the API server's
/// field validation is: a property no schema names is refused, not pruned.
fn keda_schema(file: &str) -> serde_json::Value {
    fn strict(s: &mut serde_json::Value) {
        let Some(o) = s.as_object_mut() else { return };
        if o.contains_key("properties")
            && !o.contains_key("additionalProperties")
            && o.get("x-kubernetes-preserve-unknown-fields") != Some(&serde_json::json!(true))
        {
            o.insert("additionalProperties".into(), serde_json::json!(false));
        }
        for (_, v) in o.iter_mut() {
            match v {
                serde_json::Value::Object(_) => strict(v),
                serde_json::Value::Array(a) => a.iter_mut().for_each(strict),
                _ => {}
            }
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keda")
        .join(file);
    let crd: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    // The API server checks metadata itself.
    schema["properties"]["metadata"] = serde_json::json!({"type": "object"});
    strict(&mut schema);
    schema
}

/// The trigger metadata keys KEDA 2.16 reads, per scaler (`pkg/scalers/<scaler>_scaler.go` at
/// tag v2.16.1), those it requires, and the auth parameters a TriggerAuthentication may give.
fn scaler_keys(
    scaler: &str,
) -> (
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
) {
    match scaler {
        "nats-jetstream" => (
            &[
                "natsServerMonitoringEndpoint",
                "account",
                "stream",
                "consumer",
                "lagThreshold",
                "activationLagThreshold",
                "useHttps",
            ],
            &[
                "natsServerMonitoringEndpoint",
                "account",
                "stream",
                "consumer",
            ],
            &["natsServerMonitoringEndpoint", "account"],
        ),
        "redis-streams" => (
            &[
                "address",
                "addresses",
                "host",
                "port",
                "username",
                "password",
                "enableTLS",
                "unsafeSsl",
                "databaseIndex",
                "stream",
                "consumerGroup",
                "pendingEntriesCount",
                "streamLength",
                "lagCount",
                "activationLagCount",
            ],
            &["address", "stream"],
            &[
                "address",
                "host",
                "port",
                "username",
                "password",
                "tls",
                "ca",
                "cert",
                "key",
                "keyPassword",
            ],
        ),
        "rabbitmq" => (
            &[
                "host",
                "queueName",
                "mode",
                "value",
                "activationValue",
                "protocol",
                "vhostName",
                "useRegex",
                "pageSize",
                "operation",
                "excludeUnacknowledged",
                "timeout",
                "unsafeSsl",
            ],
            &["host", "queueName", "mode", "value"],
            &[
                "host",
                "protocol",
                "username",
                "password",
                "tls",
                "ca",
                "cert",
                "key",
                "keyPassword",
            ],
        ),
        "kafka" => (
            &[
                "bootstrapServers",
                "consumerGroup",
                "topic",
                "lagThreshold",
                "activationLagThreshold",
                "offsetResetPolicy",
                "allowIdleConsumers",
                "excludePersistentLag",
                "scaleToZeroOnInvalidOffset",
                "limitToPartitionsWithLag",
                "partitionLimitation",
                "version",
                "unsafeSsl",
                "sasl",
                "tls",
            ],
            &["bootstrapServers", "consumerGroup"],
            &[
                "sasl",
                "username",
                "password",
                "tls",
                "ca",
                "cert",
                "key",
                "keyPassword",
            ],
        ),
        "cpu" | "memory" => (&["value"], &["value"], &[]),
        other => panic!("no KEDA {other} scaler is rendered by Weir"),
    }
}

/// Queue lag on each broker kind: one ScaledObject per consumer, with the scaler of its
/// broker aimed at the stream and consumer the sidecar reads with, and a TriggerAuthentication
/// naming the Broker Secret's keys. Each is checked field by field against KEDA 2.16's CRD
/// schema and each trigger's metadata against the keys its scaler reads.
#[test]
fn queue_lag_renders_keda_objects_per_broker_kind_that_kedas_schema_accepts() {
    let text = rendered(&["render", "-f", "operator/tests/autoscaling/brokers.yaml"]);
    let docs = documents(&text);
    let scaled_object =
        jsonschema::validator_for(&keda_schema("keda.sh_scaledobjects.yaml")).unwrap();
    let trigger_auth =
        jsonschema::validator_for(&keda_schema("keda.sh_triggerauthentications.yaml")).unwrap();
    let mut scalers = Vec::new();
    let mut golden = Vec::new();
    for d in &docs {
        let ns = d["metadata"]["namespace"].as_str().unwrap_or_default();
        match d["kind"].as_str().unwrap_or_default() {
            "Deployment" => assert!(d["spec"].get("replicas").is_none(), "{ns}: {d}"),
            "ScaledObject" => {
                accepted(&scaled_object, d);
                assert_eq!(d["spec"]["scaleTargetRef"]["name"], "packer");
                let auth = docs.iter().find(|t| {
                    t["kind"] == "TriggerAuthentication" && t["metadata"]["namespace"] == ns
                });
                for t in d["spec"]["triggers"].as_array().unwrap() {
                    let scaler = t["type"].as_str().unwrap();
                    let (known, required, auth_params) = scaler_keys(scaler);
                    let meta = t["metadata"].as_object().unwrap();
                    for k in meta.keys() {
                        assert!(
                            known.contains(&k.as_str()),
                            "{ns}: {scaler} reads no metadata {k:?}"
                        );
                    }
                    for k in required {
                        assert!(meta.contains_key(*k), "{ns}: {scaler} requires {k:?}: {t}");
                    }
                    if let Some(name) = t["authenticationRef"]["name"].as_str() {
                        let auth =
                            auth.unwrap_or_else(|| panic!("{ns}: no TriggerAuthentication {name}"));
                        assert_eq!(auth["metadata"]["name"], name);
                        for r in auth["spec"]["secretTargetRef"].as_array().unwrap() {
                            let p = r["parameter"].as_str().unwrap();
                            assert!(
                                auth_params.contains(&p),
                                "{ns}: {scaler} takes no auth parameter {p:?}"
                            );
                        }
                    }
                    if scaler == "cpu" || scaler == "memory" {
                        assert_eq!(t["metricType"], "Utilization");
                    } else {
                        scalers.push(scaler.to_string());
                    }
                }
                golden.push(d.clone());
            }
            "TriggerAuthentication" => {
                accepted(&trigger_auth, d);
                golden.push(d.clone());
            }
            _ => {}
        }
    }
    assert_eq!(
        scalers,
        ["nats-jetstream", "redis-streams", "rabbitmq", "kafka"]
    );
    // The schema check can fail: a field KEDA does not know is refused.
    let mut typo = golden[0].clone();
    typo["spec"]["minReplicas"] = serde_json::json!(1);
    assert!(
        !scaled_object.is_valid(&typo),
        "the strict schema must refuse spec.minReplicas"
    );
    let text = golden
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    check_golden("autoscaling-brokers.yaml", &text);
}

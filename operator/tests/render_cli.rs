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

//! `weir render` of a Saga: its coordinator, through the real binary, against a golden file
//! (`UPDATE_GOLDEN=1 cargo test -p weir --test saga_render` rewrites it; review the diff).

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

#[test]
fn renders_examples_saga_like_the_golden_file() {
    let out = weir(&["render", "-f", "examples/saga", "-n", "shop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actual = String::from_utf8(out.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/saga.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from `weir render` output; rerun with UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

#[test]
fn the_coordinator_of_the_example_saga_shows_in_weir_render_of_all_examples() {
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
    let coordinator = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "place-order-saga")
        .expect("the Saga's coordinator Deployment");
    let pod = &coordinator["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["args"][0], "saga-coordinator");
    assert_eq!(pod["initContainers"][0]["name"], "weir-proxy");
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap" && d["metadata"]["name"] == "place-order-saga-weir-proxy"
        })
        .unwrap();
    let saga: serde_json::Value =
        serde_json::from_str(cm["data"]["saga.json"].as_str().unwrap()).unwrap();
    assert_eq!(saga["steps"].as_array().unwrap().len(), 3);
    let lint = weir(&["lint", "-f", "examples/"]);
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );
}

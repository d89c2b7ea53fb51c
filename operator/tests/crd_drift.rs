//! The CRD YAML under charts/weir/crds/ is generated from the Rust types; this fails when it
//! drifts. Regenerate with `cargo run -p weir -- crd --out-dir charts/weir/crds`.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir/crds");
    let mut expected_files = Vec::new();
    for crd in weir_crds::crd::all() {
        let file = weir_crds::crd::file_name(&crd);
        let path = dir.join(&file);
        let committed =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == weir_crds::crd::to_yaml(&crd),
            "{} drifted from crds/src: run `cargo run -p weir -- crd --out-dir charts/weir/crds`",
            path.display()
        );
        expected_files.push(file);
    }
    let mut present: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present,
        expected_files,
        "stale CRD files in {}",
        dir.display()
    );
}

#[test]
fn weir_crd_prints_the_same_crds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        weir_crds::crd::all_yaml()
    );
}

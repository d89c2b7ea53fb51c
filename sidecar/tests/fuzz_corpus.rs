//! Replays the fuzz seed corpus (`sidecar/fuzz/corpus/`) through the fuzz targets' checks, so the
//! parsers' invariants are exercised by plain `cargo test` where `cargo fuzz` cannot run.

use std::path::Path;
use weir_crds::proxy::ProxyConfig;
use weir_proxy::edge::jwt::KeySet;
use weir_proxy::fuzzing::{check_config, check_jwks, check_jwt, check_traceparent};
use weir_proxy::trace::parse_traceparent;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "seed corpus for {target} is missing");
    out
}

#[test]
fn config_corpus() {
    for (name, data) in corpus("config") {
        check_config(&data);
        let accepted = ProxyConfig::from_json(std::str::from_utf8(&data).unwrap_or("")).is_ok();
        let expected = matches!(name.as_str(), "full.json" | "minimal.json");
        assert_eq!(accepted, expected, "{name}");
    }
}

#[test]
fn traceparent_corpus() {
    for (name, data) in corpus("traceparent") {
        check_traceparent(&data);
        let accepted = parse_traceparent(&data).is_some();
        let expected = name.starts_with("valid") || name == "future-version";
        assert_eq!(accepted, expected, "{name}");
    }
}

#[test]
fn jwt_corpus() {
    for (name, data) in corpus("jwt") {
        let accepted = check_jwt(&data);
        check_jwks(&data);
        assert_eq!(accepted, name.starts_with("valid"), "{name}");
        assert_eq!(
            KeySet::from_jwks(&data).is_ok(),
            name.starts_with("jwks"),
            "{name}"
        );
    }
}

fn run(target: &str, data: &[u8]) {
    match target {
        "config" => check_config(data),
        "traceparent" => check_traceparent(data),
        _ => {
            check_jwt(data);
            check_jwks(data);
        }
    }
}

/// Mutations of the seeds (truncations and single-byte flips), as a fuzzer's first steps would.
#[test]
fn mutated_seeds_never_panic() {
    for target in ["config", "traceparent", "jwt"] {
        for (_, seed) in corpus(target) {
            for cut in 0..seed.len().min(400) {
                let mut m = seed[..cut].to_vec();
                run(target, &m);
                if cut < seed.len() {
                    m.extend_from_slice(&seed[cut..]);
                    for b in [b'-', b'0', b'{', 0xff, b'"', b'.'] {
                        m[cut] = b;
                        run(target, &m);
                    }
                }
            }
        }
    }
}

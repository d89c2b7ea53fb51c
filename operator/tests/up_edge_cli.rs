//! `weir up` on examples/edge: the gateway is a pure weir-proxy (no app) that checks an HS256
//! JWT whose key comes from `--secrets-dir`, routes /orders to orders with the identity it
//! vouches for (signed with the run's identity key), and an internal service reached directly
//! drops a forged `x-user-id`. Needs `cargo build --workspace --bins` (scripts/test.sh does it).

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &[u8] = b"a-local-test-secret-of-at-least-32-bytes!!";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn token(sub: &str, role: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let head = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64url(
        serde_json::json!({"iss": "https://id.example.com/", "aud": "shop-api",
                           "sub": sub, "role": role, "exp": exp})
        .to_string()
        .as_bytes(),
    );
    let sig = b64url(&hmac_sha256(SECRET, format!("{head}.{claims}").as_bytes()));
    format!("{head}.{claims}.{sig}")
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_pure_edge_gateway_runs_under_weir_up() {
    let target = root().join("target/debug");
    for bin in ["weir-proxy", "weir-echo"] {
        assert!(
            target.join(bin).is_file(),
            "{bin} not built: run `cargo build --workspace --bins` first"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("shop-jwt")).unwrap();
    std::fs::write(secrets.join("shop-jwt/secret"), SECRET).unwrap();
    let state = dir.path().join("state.json");
    let path = format!(
        "{}:{}",
        target.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Without the Secret's stand-in, weir up says which file it needs.
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["up", "-f", "examples/edge"])
        .current_dir(root())
        .env("PATH", &path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.edge.jwt.hmacSecretRef") && err.contains("--secrets-dir"),
        "{err}"
    );

    let mut up = Up(Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["up", "-f", "examples/edge", "--secrets-dir"])
        .arg(&secrets)
        .arg("--state-file")
        .arg(&state)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .current_dir(root())
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap());
    let start = Instant::now();
    while !state.exists() {
        if let Ok(Some(st)) = up.0.try_wait() {
            panic!("weir up exited early: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let port = |svc: &str| s["services"][svc]["inbound"].as_u64().unwrap() as u16;
    // The gateway has `replicas: 2`: two weir-proxies, no app; replica 0 is its URL.
    for r in ["gateway-0", "gateway-1"] {
        assert!(
            s["services"][r]["pid"].is_null() && s["services"][r]["proxyPid"].is_u64(),
            "{r} runs its weir-proxy and no app: {s}"
        );
    }
    let (st, resp) = get(port("gateway-1"), "/orders/", &[]);
    assert_eq!(st, 401, "each replica checks the token: {resp}");

    let (st, resp) = get(port("gateway-0"), "/orders/", &[]);
    assert_eq!(st, 401, "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{resp}"
    );

    let bearer = format!("Bearer {}", token("alice", "admin"));
    let (st, resp) = get(
        port("gateway-0"),
        "/orders/",
        &[("authorization", &bearer), ("x-user-id", "mallory")],
    );
    assert_eq!(st, 200, "{resp}");
    assert!(resp.contains(r#""service":"orders""#), "{resp}");
    assert!(
        resp.contains(r#""user":"alice""#) && resp.contains(r#""role":"admin""#),
        "identity from the token, signed through to orders: {resp}"
    );

    let (st, resp) = get(port("orders"), "/", &[("x-user-id", "mallory")]);
    assert_eq!(st, 200, "{resp}");
    assert!(
        resp.contains(r#""user":null"#),
        "a forged x-user-id sent straight to orders is dropped: {resp}"
    );
}

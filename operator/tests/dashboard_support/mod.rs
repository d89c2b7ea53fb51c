//! Headless Chromium for the dashboard's tests, driven over W3C WebDriver: `chromedriver` on a
//! free port, and a small blocking client speaking its JSON over plain HTTP/1.1.
//!
//! Without chromium or chromedriver a test fails, naming scripts/setup.sh, unless
//! `WEIR_SKIP_BROWSER=1` (then it says plainly that it skipped).
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// One HTTP/1.1 exchange with chromedriver: status and the JSON answer.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let payload = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        payload.len()
    );
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(payload.as_bytes()).map_err(|e| e.to_string())?;
    // Read the head, then the body by its content-length (chromedriver may keep the
    // connection open), else to the end.
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the answer's head".into());
        }
        out.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&out[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            while out.len() < head_end + len {
                let n = s.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        }
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&out[head_end..]).to_string();
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(&text)
    } else {
        text
    };
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Ok((status, v))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running chromedriver; killed when dropped.
pub struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

/// Starts chromedriver, or says why not: `None` only when `WEIR_SKIP_BROWSER=1`.
pub fn driver() -> Option<Driver> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let chromedriver = on_path("chromedriver");
    let (Some(_), Some(chromedriver)) = (chromium, chromedriver) else {
        if std::env::var("WEIR_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: chromium or chromedriver is not installed and WEIR_SKIP_BROWSER=1: the dashboard's browser test did not run"
            );
            return None;
        }
        panic!(
            "chromium and chromedriver are needed for the dashboard's browser tests: run scripts/setup.sh (Debian packages chromium, chromium-driver), or set WEIR_SKIP_BROWSER=1 to skip them"
        );
    };
    let port = weir_broker::local::free_port(weir_broker::local::PortSpan::Tests)
        .expect("a free port for chromedriver");
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let d = Driver {
        child,
        port,
        profile: tempfile::tempdir().unwrap(),
    };
    let start = Instant::now();
    loop {
        if let Ok((200, v)) = http(port, "GET", "/status", None)
            && v["value"]["ready"] == json!(true)
        {
            return Some(d);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "chromedriver not ready on port {port} after 30s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// A headless Chromium window of 1280×800.
    pub fn session(&self) -> Session {
        let binary = on_path("chromium")
            .or_else(|| on_path("chromium-browser"))
            .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,800", "--hide-scrollbars",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            },
        }}});
        let (st, v) = http(self.port, "POST", "/session", Some(&caps)).expect("new session");
        assert_eq!(st, 200, "new session: {v}");
        Session {
            port: self.port,
            id: v["value"]["sessionId"].as_str().unwrap().to_string(),
        }
    }
}

/// One browser window.
pub struct Session {
    port: u16,
    id: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (st, v) = http(
            self.port,
            method,
            &format!("/session/{}{path}", self.id),
            body.as_ref(),
        )?;
        if st == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{method} {path}: {st} {v}"))
        }
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs a script in the page; its return value.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The rendered text of the first element matching `css`, if there is one.
    pub fn text(&self, css: &str) -> Option<String> {
        self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            json!([css]),
        )
        .as_str()
        .map(str::to_string)
    }

    /// Clicks the first element matching `css` as a user would (WebDriver's element click).
    pub fn click(&self, css: &str) {
        let e = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        let id = e[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: no element id in {e}"))
            .to_string();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})))
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types into the element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        let id = e[ELEMENT].as_str().unwrap().to_string();
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Waits until the text of `css` passes `ok`; panics with the page's text after `timeout`.
    pub fn wait_text(
        &self,
        what: &str,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            if let Some(t) = self.text(css)
                && ok(&t)
            {
                eprintln!("  ok: {what} ({:.1}s)", start.elapsed().as_secs_f64());
                return t;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what} ({css}); it reads {:?}; the page reads:\n{}",
                    self.text(css),
                    self.text("body").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The window as PNG, written to `dir/name.png`.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        use base64::Engine as _;
        let v = self
            .cmd("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("{e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 PNG"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(dir).unwrap();
        let f = dir.join(format!("{name}.png"));
        std::fs::write(&f, png).unwrap();
        eprintln!("  screenshot: {}", f.display());
        f
    }
}

/// Where the tests write screenshots: `$CARGO_TARGET_TMPDIR/dashboard`. With
/// `WEIR_DASHBOARD_DOCS=1` they are copied into docs/dashboard/ as well (the README's).
pub fn shots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard")
}

pub fn publish_to_docs(shot: &Path, as_name: &str) {
    if std::env::var("WEIR_DASHBOARD_DOCS").as_deref() == Ok("1") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(shot, dir.join(as_name)).unwrap();
    }
}

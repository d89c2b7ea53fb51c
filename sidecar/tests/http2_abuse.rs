//! Hostile HTTP/2 clients on raw sockets against the real `weir-proxy` binary: the known
//! attacks are bounded, each ends its connection with a `GOAWAY` naming the error, is counted
//! (`weir_http2_goaways_sent_total`), and leaves the proxy serving everyone else with its memory
//! where it was.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const ENHANCE_YOUR_CALM: u32 = 0xb;
const FLOW_CONTROL_ERROR: u32 = 0x3;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Headers as literals without indexing, no Huffman: a block anyone can read.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in headers {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, n.len());
        out.extend_from_slice(n.as_bytes());
        hpack_int(&mut out, 0, 7, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn get_block(authority: &str) -> Vec<u8> {
    hpack(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", authority),
    ])
}

/// Opens a connection and sends the preface with empty SETTINGS.
fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    s
}

/// Reads frames until a GOAWAY (its error code) or the end of the connection (`None`).
fn read_until_goaway(s: &mut TcpStream) -> Option<u32> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let kind = buf[3];
            if kind == GOAWAY && len >= 8 {
                let p = &buf[9..9 + len];
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            buf.drain(..9 + len);
        }
        if Instant::now() > deadline {
            panic!("neither GOAWAY nor close within 10 s");
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes, ignoring a connection the proxy already closed (the point of the attack).
fn send(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

fn goaways(metrics: &str, reason: &str) -> f64 {
    let prefix =
        format!(r#"weir_http2_goaways_sent_total{{listener="inbound",reason="{reason}"}}"#);
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn setup() -> (Upstream, Proxy, weir_crds::proxy::ProxyConfig) {
    let app = upstream(|_, _| async { respond(200, "ok") }).await;
    let cfg = base_config(app.addr);
    let p = proxy(cfg.clone()).await;
    (app, p, cfg)
}

async fn still_serves(cfg: &weir_crds::proxy::ProxyConfig) {
    let r = get(&client(), format!("http://{}/after", cfg.inbound.listen)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}

async fn metrics(cfg: &weir_crds::proxy::ProxyConfig) -> String {
    get(&client(), format!("http://{}/metrics", cfg.admin.listen))
        .await
        .body
}

#[tokio::test]
async fn rapid_reset_is_ended_with_enhance_your_calm_and_counted() {
    let (_app, _p, cfg) = setup().await;
    let addr = cfg.inbound.listen;
    let code = tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        let block = get_block("x");
        // CVE-2023-44487: open a stream and cancel it at once, thousands of times, in one write.
        let mut burst = Vec::new();
        for i in 0..5_000u32 {
            let id = 2 * i + 1;
            burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        send(&mut s, &burst);
        read_until_goaway(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
    still_serves(&cfg).await;
    assert_eq!(goaways(&metrics(&cfg).await, "ENHANCE_YOUR_CALM"), 1.0);
}

#[tokio::test]
async fn a_continuation_flood_is_ended_and_counted() {
    let (_app, _p, cfg) = setup().await;
    let addr = cfg.inbound.listen;
    let code = tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
        // frames of small headers, far past any header list limit.
        let mut flood = frame(HEADERS, 0, 1, &get_block("x"));
        let piece = hpack(&[("x-flood", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")]);
        for _ in 0..20_000 {
            flood.extend(frame(CONTINUATION, 0, 1, &piece));
        }
        send(&mut s, &flood);
        read_until_goaway(&mut s)
    })
    .await
    .unwrap();
    assert!(code.is_some(), "the connection got a GOAWAY");
    still_serves(&cfg).await;
    let m = metrics(&cfg).await;
    assert!(
        m.contains("weir_http2_goaways_sent_total{listener=\"inbound\""),
        "{m}"
    );
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_without_harm() {
    let (app, _p, cfg) = setup().await;
    let addr = cfg.inbound.listen;
    tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        // 100 KiB of headers in one block (over the 64 KiB list limit), split in frames of
        // the default 16 KiB maximum.
        let big = "b".repeat(1000);
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), "GET".into()),
            (":scheme".into(), "http".into()),
            (":path".into(), "/".into()),
            (":authority".into(), "x".into()),
        ];
        for i in 0..100 {
            headers.push((format!("x-big-{i}"), big.clone()));
        }
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let block = hpack(&refs);
        let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if last { END_HEADERS } else { 0 } | if i == 0 { END_STREAM } else { 0 };
            out.extend(frame(kind, flags, 1, c));
        }
        send(&mut s, &out);
        // Whatever the codec answers (a 431, a stream reset or a GOAWAY), it answers.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
    })
    .await
    .unwrap();
    assert_eq!(app.hits(), 0, "the request never reached the app");
    still_serves(&cfg).await;
}

#[tokio::test]
async fn ping_and_settings_floods_leave_memory_bounded() {
    let (_app, mut p, cfg) = setup().await;
    let pid = p.child().id();
    let before = rss_kib(pid);
    let addr = cfg.inbound.listen;
    tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        // Never read: every PING and SETTINGS wants an answer the proxy cannot send.
        let mut flood = Vec::new();
        for i in 0..200_000u64 {
            flood.extend(frame(PING, 0, 0, &i.to_be_bytes()));
            if i % 4 == 0 {
                flood.extend(frame(SETTINGS, 0, 0, &[]));
            }
        }
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        send(&mut s, &flood);
        // Hold the connection a moment, unread, then drop it.
        std::thread::sleep(Duration::from_millis(500));
    })
    .await
    .unwrap();
    still_serves(&cfg).await;
    let after = rss_kib(pid);
    assert!(
        after < before + 20 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test]
async fn a_window_update_past_the_limit_is_a_flow_control_error() {
    let (_app, _p, cfg) = setup().await;
    let addr = cfg.inbound.listen;
    let code = tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        // The connection window starts at 65 535; two increments of 2^31-1 overflow it.
        let inc = 0x7fff_ffffu32.to_be_bytes();
        let mut out = frame(WINDOW_UPDATE, 0, 0, &inc);
        out.extend(frame(WINDOW_UPDATE, 0, 0, &inc));
        send(&mut s, &out);
        read_until_goaway(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(FLOW_CONTROL_ERROR));
    still_serves(&cfg).await;
    assert_eq!(goaways(&metrics(&cfg).await, "FLOW_CONTROL_ERROR"), 1.0);
}

#[tokio::test]
async fn data_on_a_stream_never_opened_is_a_protocol_error() {
    let (_app, _p, cfg) = setup().await;
    let addr = cfg.inbound.listen;
    let code = tokio::task::spawn_blocking(move || {
        let mut s = open(addr);
        send(&mut s, &frame(DATA, 0, 7, b"surprise"));
        read_until_goaway(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0x1), "PROTOCOL_ERROR");
    still_serves(&cfg).await;
}

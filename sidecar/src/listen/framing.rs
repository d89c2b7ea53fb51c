//! Finds requests that carry both `Content-Length` and `Transfer-Encoding` (a request-smuggling
//! vector), which hyper's parser resolves silently: Transfer-Encoding wins and Content-Length is
//! dropped before the service sees the request (RFC 9112 §6.3), so the headers alone cannot tell.
//!
//! [`Tapped`] wraps an accepted connection and hands every byte read to a [`Tap`], which keeps
//! only the bytes of request heads not dispatched yet: when a request is dispatched,
//! [`Tap::dispatched`] finds its head at the start of the copy, checks its header names if the
//! request has `Transfer-Encoding`, drops it, and from then on skips this request's body by its
//! framing (the length hyper decoded, or chunk by chunk exactly as hyper's decoder does) without
//! copying it. So the copy stays aligned with the requests on the connection, keep-alive and
//! pipelined alike, and is small: in the common case one head, copied once, no allocation after
//! the first request. It is bounded by [`LIMIT`]; if more undispatched bytes than that arrive
//! (a flood of pipelined requests), the connection's later heads cannot be checked and
//! `Transfer-Encoding` requests on it are refused rather than let through unchecked.

use http::Request;
use http::header::TRANSFER_ENCODING;
use hyper::body::Body;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most undispatched bytes kept: the largest request head hyper accepts, so any head fits.
pub const LIMIT: usize = crate::listen::MAX_HEAD_BYTES;
/// A copy that grew past this (large heads) is given back once empty.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Why a request is refused.
pub const BOTH: &str = "Content-Length together with Transfer-Encoding";
pub const UNCHECKED: &str = "Transfer-Encoding request whose head could not be checked";

/// The shared view of one connection's raw request bytes.
#[derive(Clone, Debug, Default)]
pub struct Tap(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// Bytes read that belong to requests not dispatched yet; starts at the next request's head.
    pending: Vec<u8>,
    /// Body of the last dispatched request still to be skipped.
    body: Framing,
    /// Bytes were lost (over [`LIMIT`], or a body hyper will refuse): alignment is gone.
    lost: bool,
}

impl Tap {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with every chunk of bytes read from the connection.
    fn read(&self, mut bytes: &[u8]) {
        let mut s = self.lock();
        if s.lost {
            return;
        }
        if !matches!(s.body, Framing::Done) {
            match s.body.frame(bytes) {
                Some(n) => bytes = &bytes[n..],
                None => return s.lose(),
            }
        }
        if bytes.is_empty() {
            return;
        }
        if s.pending.len() + bytes.len() > LIMIT {
            return s.lose();
        }
        s.pending.extend_from_slice(bytes);
    }

    /// Called when hyper hands a parsed request to the service: `Err` names why it must be
    /// refused. Its head is the first one among the pending bytes.
    pub fn dispatched<B: Body>(&self, req: &Request<B>) -> Result<(), &'static str> {
        let te = req.headers().contains_key(TRANSFER_ENCODING);
        let mut guard = self.lock();
        let s = &mut *guard;
        let head = if s.lost {
            None
        } else {
            scan_head(&s.pending, te).filter(|h| h.matches(&s.pending, req))
        };
        let Some(head) = head else {
            s.lose();
            return if te { Err(UNCHECKED) } else { Ok(()) };
        };
        if te && head.content_length {
            return Err(BOTH);
        }
        s.pending.drain(..head.len);
        // The body as hyper frames it: chunked with Transfer-Encoding, else its decoded length.
        s.body = if te {
            Framing::chunked()
        } else {
            match req.body().size_hint().exact() {
                Some(0) => Framing::Done,
                Some(n) => Framing::Length(n),
                None => {
                    s.lose();
                    return Ok(());
                }
            }
        };
        if !s.pending.is_empty() {
            match s.body.frame(&s.pending) {
                Some(n) => drop(s.pending.drain(..n)),
                None => s.lose(),
            }
        }
        if s.pending.is_empty() && s.pending.capacity() > KEEP_CAPACITY {
            s.pending = Vec::new();
        }
        Ok(())
    }
}

impl State {
    fn lose(&mut self) {
        self.lost = true;
        self.pending = Vec::new();
    }
}

/// A request head found at the start of the pending bytes.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes up to and including the empty line.
    len: usize,
    /// The request line, without its line ending.
    line: (usize, usize),
    /// A `Content-Length` header line (only looked for when asked).
    content_length: bool,
}

impl Head {
    /// The request line is `METHOD SP target SP version` of this request.
    fn matches<B>(&self, bytes: &[u8], req: &Request<B>) -> bool {
        let line = &bytes[self.line.0..self.line.1];
        let version: &[u8] = match req.version() {
            http::Version::HTTP_10 => b" HTTP/1.0",
            _ => b" HTTP/1.1",
        };
        let Some(rest) = line
            .strip_prefix(req.method().as_str().as_bytes())
            .and_then(|r| r.strip_prefix(b" "))
            .and_then(|r| r.strip_suffix(version))
        else {
            return false;
        };
        // Origin-form targets are kept as sent; absolute and authority forms are not compared.
        let uri = req.uri();
        match uri.path_and_query() {
            Some(pq) if uri.scheme().is_none() && uri.authority().is_none() => {
                rest.starts_with(pq.as_str().as_bytes())
            }
            _ => true,
        }
    }
}

/// The complete head at the start of `bytes` (as httparse reads it: empty lines before the
/// request line are skipped, lines end with CRLF or LF), with `Content-Length` looked for when
/// `names` is set. `None` when the head is not complete.
fn scan_head(bytes: &[u8], names: bool) -> Option<Head> {
    let mut start = 0;
    while bytes[start..].starts_with(b"\n") || bytes[start..].starts_with(b"\r\n") {
        start += if bytes[start] == b'\n' { 1 } else { 2 };
    }
    let mut request_line = None;
    let mut content_length = false;
    loop {
        let end = start + bytes[start..].iter().position(|&b| b == b'\n')?;
        let line = &bytes[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match request_line {
            None => request_line = Some((start, start + line.len())),
            Some(_) if line.is_empty() => {
                return Some(Head {
                    len: end + 1,
                    line: request_line?,
                    content_length,
                });
            }
            Some(_) if names => {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                content_length |= name.eq_ignore_ascii_case(b"content-length");
            }
            Some(_) => {}
        }
        start = end + 1;
    }
}

/// How much of the stream after a head is its body, mirroring hyper's decoders.
#[derive(Clone, Copy, Debug, Default)]
enum Framing {
    #[default]
    Done,
    Length(u64),
    Chunked(Chunk, u64),
}

/// hyper's chunked decoder states (`proto/h1/decode.rs`), strict CRLF framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

impl Framing {
    fn chunked() -> Framing {
        Framing::Chunked(Chunk::Start, 0)
    }

    /// How many leading bytes of `bytes` belong to the body; `None` for framing hyper refuses.
    fn frame(&mut self, bytes: &[u8]) -> Option<usize> {
        match self {
            Framing::Done => Some(0),
            Framing::Length(rem) => {
                let n = (*rem).min(bytes.len() as u64);
                *rem -= n;
                if *rem == 0 {
                    *self = Framing::Done;
                }
                Some(n as usize)
            }
            Framing::Chunked(state, size) => {
                let mut i = 0;
                while i < bytes.len() {
                    if *state == Chunk::Data {
                        let n = (*size).min((bytes.len() - i) as u64);
                        *size -= n;
                        i += n as usize;
                        if *size == 0 {
                            *state = Chunk::DataCr;
                        }
                        continue;
                    }
                    let b = bytes[i];
                    i += 1;
                    let hex = (b as char).to_digit(16).map(u64::from);
                    *state = match (*state, b, hex) {
                        (Chunk::Start | Chunk::Size, _, Some(d)) => {
                            *size = size.checked_mul(16)?.checked_add(d)?;
                            Chunk::Size
                        }
                        (Chunk::Size | Chunk::SizeLws, b'\t' | b' ', _) => Chunk::SizeLws,
                        (Chunk::Size | Chunk::SizeLws, b';', _) => Chunk::Extension,
                        (Chunk::Size | Chunk::SizeLws | Chunk::Extension, b'\r', _) => {
                            Chunk::SizeLf
                        }
                        (Chunk::Extension, b'\n', _) => return None,
                        (Chunk::Extension, _, _) => Chunk::Extension,
                        (Chunk::SizeLf, b'\n', _) if *size == 0 => Chunk::EndCr,
                        (Chunk::SizeLf, b'\n', _) => Chunk::Data,
                        (Chunk::DataCr, b'\r', _) => Chunk::DataLf,
                        (Chunk::DataLf, b'\n', _) => Chunk::Start,
                        (Chunk::Trailer, b'\r', _) => Chunk::TrailerLf,
                        (Chunk::Trailer, _, _) => Chunk::Trailer,
                        (Chunk::TrailerLf, b'\n', _) => Chunk::EndCr,
                        (Chunk::EndCr, b'\r', _) => Chunk::EndLf,
                        (Chunk::EndCr, _, _) => Chunk::Trailer,
                        (Chunk::EndLf, b'\n', _) => {
                            *self = Framing::Done;
                            return Some(i);
                        }
                        _ => return None,
                    };
                }
                Some(i)
            }
        }
    }
}

/// An accepted connection whose reads are copied to a [`Tap`]; writes pass straight through.
#[derive(Debug)]
pub struct Tapped<T> {
    inner: T,
    tap: Tap,
}

impl<T> Tapped<T> {
    pub fn new(inner: T, tap: Tap) -> Self {
        Tapped { inner, tap }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tapped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            this.tap.read(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tapped<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    fn req(
        method: &str,
        target: &str,
        te: bool,
        len: Option<usize>,
    ) -> Request<Full<bytes::Bytes>> {
        let mut b = Request::builder().method(method).uri(target);
        if te {
            b = b.header("transfer-encoding", "chunked");
        }
        // `Full` reports its exact length, as hyper's body does for Content-Length.
        let body = bytes::Bytes::from(vec![b'x'; len.unwrap_or(0)]);
        b.body(Full::new(body)).unwrap()
    }

    fn chunked(method: &str, target: &str) -> Request<Empty<bytes::Bytes>> {
        Request::builder()
            .method(method)
            .uri(target)
            .header("transfer-encoding", "chunked")
            .body(Empty::new())
            .unwrap()
    }

    #[test]
    fn heads_are_scanned_like_httparse() {
        let h = scan_head(
            b"\r\nPOST / HTTP/1.1\nA: b\r\nContent-LENGTH: 1\n\r\nrest",
            true,
        );
        assert_eq!(
            h,
            Some(Head {
                len: 44,
                line: (2, 17),
                content_length: true
            })
        );
        // A value that mentions the name is not the header.
        let h = scan_head(b"POST / HTTP/1.1\r\nx: content-length: 1\r\n\r\n", true).unwrap();
        assert!(!h.content_length);
        assert_eq!(scan_head(b"POST / HTTP/1.1\r\nA: b\r\n", true), None);
    }

    #[test]
    fn both_headers_in_either_order_are_refused() {
        for raw in [
            "POST /x?a=1 HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /x?a=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST /x?a=1 HTTP/1.1\nTRANSFER-ENCODING: chunked\nCONTENT-length: 3\n\n",
        ] {
            let tap = Tap::default();
            tap.read(raw.as_bytes());
            assert_eq!(
                tap.dispatched(&chunked("POST", "/x?a=1")),
                Err(BOTH),
                "{raw}"
            );
        }
    }

    #[test]
    fn bodies_are_skipped_so_later_heads_stay_aligned() {
        let tap = Tap::default();
        // Fed in small pieces: a chunked body with an extension and a trailer, then a body
        // by length, then a smuggled head after a plain one.
        let stream = concat!(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "6;x=y\r\nPOST /\r\n1a \r\nPOST / HTTP/1.1\r\nhost: x\r\n\r\n0\r\nt: 1\r\n\r\n",
            "PUT /b HTTP/1.1\r\ncontent-length: 10\r\n\r\n0123456789",
            "GET /c HTTP/1.1\r\n\r\n",
            "POST /d HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
        );
        let (a, rest) = stream.split_at(40);
        tap.read(a.as_bytes());
        tap.read(&rest.as_bytes()[..12]);
        assert_eq!(tap.dispatched(&chunked("POST", "/a")), Ok(()));
        for piece in rest.as_bytes()[12..].chunks(3) {
            tap.read(piece);
        }
        assert_eq!(tap.dispatched(&req("PUT", "/b", false, Some(10))), Ok(()));
        assert_eq!(tap.dispatched(&req("GET", "/c", false, None)), Ok(()));
        assert_eq!(tap.dispatched(&chunked("POST", "/d")), Err(BOTH));
        assert!(!tap.lock().lost);
    }

    #[test]
    fn a_head_that_cannot_be_found_fails_closed_for_chunked_requests_only() {
        let tap = Tap::default();
        tap.read(b"GET / HTTP/1.1\r\n\r\n");
        // Not the head that was read: alignment is lost.
        assert_eq!(tap.dispatched(&req("GET", "/other", false, None)), Ok(()));
        tap.read(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(tap.dispatched(&chunked("POST", "/")), Err(UNCHECKED));
        // Over the limit.
        let tap = Tap::default();
        tap.read(&vec![b'a'; LIMIT + 1]);
        assert!(tap.lock().lost && tap.lock().pending.capacity() == 0);
    }
}

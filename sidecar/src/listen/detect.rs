//! Which HTTP version a connection speaks, read off its first bytes.
//!
//! Every listener accepts HTTP/1.1 and cleartext HTTP/2 with prior knowledge (h2c, what gRPC
//! clients and other sidecars send): an HTTP/2 client opens with the fixed 24-byte connection
//! preface (RFC 9113 §3.4), which no HTTP/1.x request line can start with. [`sniff`] reads until
//! the bytes either are the preface or cannot become it, and [`Rewind`] hands the bytes read back
//! to the protocol's server, so nothing is consumed. HTTP/1.1 `Upgrade: h2c` is not offered: no
//! gRPC client uses it, and RFC 9113 deprecates it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

impl Version {
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::Http1 => "http1",
            Version::Http2 => "http2",
        }
    }
}

/// Reads from `io` until its first bytes are the HTTP/2 preface or cannot be: returns the
/// version and the bytes read. A connection closed before (or with no byte at all) is HTTP/1:
/// its server then sees the same bytes and end of stream, and answers or closes as it would.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<(Version, Vec<u8>)> {
    let mut buf = Vec::with_capacity(PREFACE.len());
    let mut chunk = [0u8; PREFACE.len()];
    while buf.len() < PREFACE.len() {
        let want = PREFACE.len() - buf.len();
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok((Version::Http1, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        if !PREFACE.starts_with(&buf) {
            return Ok((Version::Http1, buf));
        }
    }
    Ok((Version::Http2, buf))
}

/// An I/O whose first reads return `prefix`, then the inner reads.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
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
    use tokio::io::AsyncWriteExt;

    async fn sniffed(chunks: &[&[u8]]) -> (Version, Vec<u8>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1024);
        for c in chunks {
            client.write_all(c).await.unwrap();
        }
        drop(client);
        let mut server = server;
        let (v, prefix) = sniff(&mut server).await.unwrap();
        let mut all = Vec::new();
        Rewind::new(prefix.clone(), server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        (v, prefix, all)
    }

    #[tokio::test]
    async fn the_preface_is_http2_and_every_byte_is_handed_back() {
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        let (v, prefix, all) = sniffed(&[&wire[..5], &wire[5..]]).await;
        assert_eq!(v, Version::Http2);
        assert_eq!(prefix, PREFACE);
        assert_eq!(all, wire);
    }

    #[tokio::test]
    async fn a_request_line_is_http1_after_its_first_byte() {
        let wire = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (v, prefix, all) = sniffed(&[wire]).await;
        assert_eq!(v, Version::Http1);
        // What one read gave (at most the preface's length) is all that was taken.
        assert!(prefix.len() <= PREFACE.len() && wire.starts_with(&prefix));
        assert_eq!(all, wire);
    }

    #[tokio::test]
    async fn a_request_line_is_known_from_its_first_byte_without_waiting_for_more() {
        // The client sends one byte and waits: sniffing must not wait for 24.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"G").await.unwrap();
        let (v, prefix) =
            tokio::time::timeout(std::time::Duration::from_secs(2), sniff(&mut server))
                .await
                .expect("decided on one byte")
                .unwrap();
        assert_eq!((v, prefix.as_slice()), (Version::Http1, &b"G"[..]));
    }

    #[tokio::test]
    async fn a_request_like_the_preface_is_told_apart_where_it_differs() {
        // `PRI` is a method name a client may send over HTTP/1.1.
        let wire = b"PRI * HTTP/1.1\r\n\r\n";
        let (v, _, all) = sniffed(&[wire]).await;
        assert_eq!(v, Version::Http1);
        assert_eq!(all, wire);
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_left_to_the_http1_server() {
        let (v, prefix, all) = sniffed(&[b"PRI * HT"]).await;
        assert_eq!(v, Version::Http1);
        assert_eq!(prefix, b"PRI * HT");
        assert_eq!(all, b"PRI * HT");
        let (v, prefix, _) = sniffed(&[]).await;
        assert_eq!((v, prefix.len()), (Version::Http1, 0));
    }
}

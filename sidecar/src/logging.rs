//! Non-blocking log output: events are formatted on the request path but written to stdout by a
//! dedicated thread through a buffer, so a slow log consumer (a full pipe, a slow container log
//! driver) never stalls the proxy. When the queue is full, lines are dropped and counted.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use tracing_subscriber::fmt::MakeWriter;

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// A `MakeWriter` handing each formatted event to the writer thread.
#[derive(Clone)]
pub struct NonBlocking {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl NonBlocking {
    /// Starts the writer thread over `out` with room for `capacity` queued lines.
    pub fn new<W: Write + Send + 'static>(out: W, capacity: usize) -> NonBlocking {
        let (tx, rx) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("weir-log".into())
            .spawn(move || writer_thread(rx, out))
            .expect("log writer thread");
        NonBlocking {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far is written.
    pub fn flush(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

fn writer_thread<W: Write>(rx: Receiver<Msg>, out: W) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write what is queued, then flush once: one syscall for a burst of lines.
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// One event's bytes; sent to the writer thread when dropped.
pub struct EventWriter {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            buf: Vec::with_capacity(256),
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>, Duration);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.1);
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_and_in_order() {
        let out = Shared::default();
        let nb = NonBlocking::new(out.clone(), 1024);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(nb.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::info!(i, "line");
            }
        });
        nb.flush();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 100);
        assert!(lines.iter().enumerate().all(|(i, l)| l["fields"]["i"] == i));
        assert_eq!(nb.dropped(), 0);
    }

    #[test]
    fn a_stuck_consumer_drops_lines_instead_of_blocking() {
        let out = Shared(Arc::default(), Duration::from_millis(50));
        let nb = NonBlocking::new(out, 4);
        let start = Instant::now();
        for _ in 0..200 {
            let mut w = nb.make_writer();
            w.write_all(b"x\n").unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "never waits for the writer"
        );
        assert!(nb.dropped() > 150, "dropped {}", nb.dropped());
    }
}

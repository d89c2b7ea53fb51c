//! Reading what the proxy exports over OTLP/HTTP: a protobuf decoder for the few
//! opentelemetry-proto messages it writes (ExportTraceServiceRequest down to Span), and a
//! collector that keeps what it receives.

use super::*;

/// A protobuf field: number and value (varint, fixed64 or bytes).
#[derive(Debug, Clone)]
pub enum Val {
    Int(u64),
    Bytes(Vec<u8>),
}

/// Decodes one protobuf message level (wire types 0, 1, 2, 5).
pub fn fields(mut b: &[u8]) -> Vec<(u32, Val)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let v = match wire {
            0 => Val::Int(varint(&mut b)),
            1 => {
                let v = u64::from_le_bytes(b[..8].try_into().unwrap());
                b = &b[8..];
                Val::Int(v)
            }
            2 => {
                let n = varint(&mut b) as usize;
                let v = b[..n].to_vec();
                b = &b[n..];
                Val::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(b[..4].try_into().unwrap());
                b = &b[4..];
                Val::Int(u64::from(v))
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((field, v));
    }
    out
}

pub fn bytes_of(fs: &[(u32, Val)], n: u32) -> Vec<Vec<u8>> {
    fs.iter()
        .filter_map(|(f, v)| match v {
            Val::Bytes(b) if *f == n => Some(b.clone()),
            _ => None,
        })
        .collect()
}

pub fn int_of(fs: &[(u32, Val)], n: u32) -> Option<u64> {
    fs.iter().find_map(|(f, v)| match v {
        Val::Int(i) if *f == n => Some(*i),
        _ => None,
    })
}

/// `KeyValue` list to (key, string or int value).
pub fn attrs(fs: &[(u32, Val)], n: u32) -> Vec<(String, String)> {
    bytes_of(fs, n)
        .iter()
        .map(|kv| {
            let kv = fields(kv);
            let key = String::from_utf8(bytes_of(&kv, 1)[0].clone()).unwrap();
            let any = fields(&bytes_of(&kv, 2)[0]);
            let val = match (bytes_of(&any, 1).first(), int_of(&any, 3)) {
                (Some(s), _) => String::from_utf8(s.clone()).unwrap(),
                (None, Some(i)) => i.to_string(),
                _ => String::new(),
            };
            (key, val)
        })
        .collect()
}

#[derive(Debug)]
pub struct Span {
    pub trace_id: String,
    pub parent: String,
    pub kind: u64,
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub service: String,
    /// `Status.code`: 0 unset, 2 error.
    pub status_code: u64,
    /// `Status.message`.
    pub status_message: String,
}

impl Span {
    /// The attribute `key`'s value, as a string.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn decode_export(body: &[u8]) -> Vec<Span> {
    let mut spans = Vec::new();
    for rs in bytes_of(&fields(body), 1) {
        let rs = fields(&rs);
        let resource = fields(&bytes_of(&rs, 1)[0]);
        let service = attrs(&resource, 1)
            .into_iter()
            .find(|(k, _)| k == "service.name")
            .unwrap()
            .1;
        for ss in bytes_of(&rs, 2) {
            let ss = fields(&ss);
            for sp in bytes_of(&ss, 2) {
                let sp = fields(&sp);
                let start = int_of(&sp, 7).unwrap();
                let end = int_of(&sp, 8).unwrap();
                assert!(
                    end >= start && start > 1_600_000_000_000_000_000,
                    "unix nanos"
                );
                spans.push(Span {
                    trace_id: hex(&bytes_of(&sp, 1)[0]),
                    parent: bytes_of(&sp, 4).first().map(|p| hex(p)).unwrap_or_default(),
                    kind: int_of(&sp, 6).unwrap(),
                    name: String::from_utf8(bytes_of(&sp, 5)[0].clone()).unwrap(),
                    attrs: attrs(&sp, 9),
                    service: service.clone(),
                    status_code: bytes_of(&sp, 15)
                        .first()
                        .and_then(|st| int_of(&fields(st), 3))
                        .unwrap_or(0),
                    status_message: bytes_of(&sp, 15)
                        .first()
                        .and_then(|st| bytes_of(&fields(st), 2).first().cloned())
                        .map(|m| String::from_utf8(m).unwrap())
                        .unwrap_or_default(),
                });
            }
        }
    }
    spans
}

/// Exports received: (path, content type, body).
pub type Exports = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// An OTLP/HTTP collector on loopback: keeps each export's path, content type and body.
pub struct Collector {
    pub server: Upstream,
    pub received: Exports,
}

impl Collector {
    pub async fn start() -> Collector {
        let received: Exports = Arc::default();
        let r2 = received.clone();
        let server = upstream(move |req, _| {
            let r2 = r2.clone();
            async move {
                let path = req.uri().path().to_string();
                let ct = req
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                r2.lock().unwrap().push((path, ct, body));
                respond(200, "")
            }
        })
        .await;
        Collector { server, received }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, b)| decode_export(b))
            .collect()
    }

    /// Waits up to 10 s for `n` spans.
    pub async fn wait_for(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.spans();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "spans received: {got:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

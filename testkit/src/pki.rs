//! A private CA and a server certificate it signed (for `127.0.0.1` and `localhost` unless told
//! otherwise), made with the `openssl` command-line tool, for tests of brokers behind TLS
//! (`ca.crt` in a Broker's Secret) and of `https://` upstreams.

use std::path::Path;
use std::process::Command;

/// `ca.crt`, `ca.key`, `server.crt` and `server.key` (P-256, valid one day) in a temporary
/// directory of their own, removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// For `127.0.0.1` and `localhost`; `None` (the test skips, saying so) when `openssl` is not
    /// installed.
    pub fn new() -> Option<Pki> {
        Self::for_names("IP:127.0.0.1,DNS:localhost")
    }

    /// With the server certificate's `subjectAltName` set to `names` (e.g. `DNS:localhost` alone,
    /// for a test that an address the certificate does not name is refused).
    pub fn for_names(names: &str) -> Option<Pki> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("SKIP: openssl not found");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("weir-pki-")
            .tempdir()
            .expect("create the PKI directory");
        std::fs::write(
            dir.path().join("server.ext"),
            format!(
                "subjectAltName={names}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("write server.ext");
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let ca = format!(
            "req -x509 -days 1 {key} -keyout ca.key -out ca.crt -subj /CN=weir-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        );
        let csr = format!("req {key} -keyout server.key -out server.csr -subj /CN=localhost");
        let sign = "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
                    -out server.crt -extfile server.ext";
        for args in [ca.as_str(), csr.as_str(), sign] {
            openssl(dir.path(), args);
        }
        Some(Pki { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of `file` (`ca.crt`, `server.crt`, `server.key`) as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_string_lossy().into_owned()
    }

    /// The CA's PEM text.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.crt")).expect("read ca.crt")
    }

    /// A credentials directory holding only `ca.crt` (TLS, no credentials), as the operator
    /// mounts a Broker's Secret into the sidecar.
    pub fn secret_with_ca(&self) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("create a credentials directory");
        std::fs::copy(self.path("ca.crt"), d.path().join("ca.crt")).expect("copy ca.crt");
        d
    }
}

fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! A private CA and a server certificate it signed for `127.0.0.1`/`localhost`, made with the
//! `openssl` command-line tool, for tests of brokers behind TLS (`ca.crt` in a Broker's Secret).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `ca.crt`, `ca.key`, `server.crt` and `server.key` (P-256, valid one day) in a directory of
/// their own, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// `None` (the test skips) when `openssl` is not installed.
    pub fn new() -> Option<Pki> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("SKIP: openssl not found");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "weir-pki-{}-{}",
            std::process::id(),
            super::brokers::free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the PKI directory");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &dir,
            &[
                &["req", "-x509", "-days", "1"],
                &key[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-subj",
                    "/CN=weir test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ],
        );
        openssl(
            &dir,
            &[
                &["req"],
                &key[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ],
        );
        openssl(
            &dir,
            &[&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                "server.crt",
                "-extfile",
                "server.ext",
            ]],
        );
        Some(Pki { dir })
    }

    /// The path of `file` (`ca.crt`, `server.crt`, `server.key`) as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// The CA's PEM text.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.crt")).expect("read ca.crt")
    }
}

fn openssl(dir: &Path, parts: &[&[&str]]) {
    let args: Vec<&str> = parts.concat();
    let out = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

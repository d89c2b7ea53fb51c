//! `weir up`'s certificate authority: the run's own trust anchor and issuer, and an identity
//! endpoint on loopback that signs each sidecar's CSR for the token `weir up` gave it, as the
//! operator's endpoint does in a cluster with ServiceAccount tokens. Sidecars then call each
//! other over mutual TLS and authorize callers by the declared graph, exactly as in a pod.
//!
//! Files, under `<work dir>/mtls/`: `bundle.pem` (the anchor), `issuer.pem` and `issuer.key`
//! (mode 0600: whoever holds it can mint identities of this run; the state file names it so
//! tests can make a certificate of an undeclared workload), and `tokens/<microservice>`.

use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use weir_identity::endpoint::{self, Endpoint, StaticTokens};
use weir_identity::{Authority, Issuer, WorkloadId};

/// The trust domain of a local run.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// How long the run's anchor and issuer are valid.
const CA_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a workload certificate is valid (renewed at 70 %).
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The run's CA and its endpoint; the endpoint stops on drop.
pub struct LocalCa {
    pub dir: PathBuf,
    pub issuer_url: String,
    tokens: Arc<StaticTokens>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LocalCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalCa {
    /// Makes the anchor and issuer, writes them under `work_dir/mtls`, and serves the endpoint
    /// on a free loopback port.
    pub async fn start(work_dir: &Path) -> Result<LocalCa> {
        let dir = work_dir.join("mtls");
        std::fs::create_dir_all(dir.join("tokens"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let now = SystemTime::now();
        let anchor = Authority::new_anchor(TRUST_DOMAIN, now, CA_VALIDITY)?;
        let issuer = Authority::new_issuer(&anchor, TRUST_DOMAIN, now, CA_VALIDITY)?;
        std::fs::write(dir.join("bundle.pem"), anchor.cert_pem())?;
        std::fs::write(dir.join("issuer.pem"), issuer.cert_pem())?;
        write_private(&dir.join("issuer.key"), &issuer.key_pem())?;
        let issuer = Issuer::new(issuer);
        let tls = endpoint::serving_config(&issuer, &["localhost".to_string()], CA_VALIDITY)?;
        let tokens = Arc::new(StaticTokens::default());
        let ep = Endpoint::new(issuer, tokens.clone(), LEAF_LIFETIME);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(ep.serve(listener, Arc::new(tls)));
        Ok(LocalCa {
            issuer_url: format!("https://localhost:{port}"),
            dir,
            tokens,
            task,
        })
    }

    pub fn bundle_file(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// The token file of `microservice`'s sidecars.
    pub fn token_file(&self, microservice: &str) -> PathBuf {
        self.dir.join("tokens").join(microservice)
    }

    /// Gives `microservice` of `namespace` a token for its identity, in its token file.
    pub fn enroll(&self, namespace: &str, microservice: &str) -> Result<()> {
        let token = self.tokens.issue(WorkloadId::microservice(
            TRUST_DOMAIN,
            namespace,
            microservice,
        ));
        write_private(&self.token_file(microservice), &token)
    }

    /// What the state file says of the run's CA.
    pub fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "trustDomain": TRUST_DOMAIN,
            "issuerUrl": self.issuer_url,
            "bundle": self.bundle_file(),
            "issuerCert": self.dir.join("issuer.pem"),
            "issuerKey": self.dir.join("issuer.key"),
        })
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

//! Kafka. For a queue's stream name `<s>` (`weir_<ns>_<q>`): the topic `<s>`, one consumer
//! group `<s>.<microservice>` per consuming Microservice, and the dead-letter topic `<s>_dlq`
//! (with `_`, not `.`: Kafka's metric names fold `.` into `_`, so a topic name mixing both can
//! collide with another's; every Weir topic uses `_` only).
//!
//! Where a Broker's `url` points (`kafka://host:port[,host:port…]`, `kafka+ssl://…` for TLS)
//! and how its Secret's credentials become a librdkafka client configuration are here too, so
//! the operator, the sidecar and `weir` commands connect the same way.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "admin")]
pub mod dead_letters;
pub mod processed;
pub mod quiet;
pub mod rewind;
pub mod transport;

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

use crate::credentials::{Auth, Credentials};

/// A record's headers as the bridge and `weir dlq` read them: name and value (as UTF-8, lossily),
/// in the record's order; a header without a value is an empty one.
pub fn headers_of<M: rdkafka::Message>(m: &M) -> Vec<(String, String)> {
    use rdkafka::message::Headers as _;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The topic of a queue: its stream name.
pub fn topic(stream: &str) -> String {
    stream.to_string()
}

/// The dead-letter topic of a queue: `<stream>_dlq`.
pub fn dead_letter_topic(stream: &str) -> String {
    format!("{stream}_dlq")
}

/// The consumer group of a consuming Microservice on a queue: `<stream>.<consumer>` (group ids
/// are cluster-wide, so the queue and its namespace are part of it).
pub fn group_id(stream: &str, consumer: &str) -> String {
    format!("{stream}.{consumer}")
}

/// A Broker `url` that does not name a Kafka cluster, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{url:?} is not a Kafka URL (use kafka://host:port[,host:port…] or kafka+ssl://…)")]
    Scheme { url: String },
    #[error("{url:?} names no bootstrap server")]
    NoServer { url: String },
    #[error("{url:?}: bootstrap server {server:?} is not host:port")]
    Server { url: String, server: String },
    #[error("{url:?}: sasl={value:?} is not one of plain, scram-sha-256, scram-sha-512")]
    Sasl { url: String, value: String },
    #[error("{url:?}: unknown query parameter {name:?} (only sasl=…)")]
    Query { url: String, name: String },
}

/// How a client authenticates with a user name and password (SASL), from the URL's
/// `?sasl=` (PLAIN when the Secret holds a user and password and the URL says nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaslMechanism {
    #[default]
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanism` value.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A parsed Kafka Broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// `host:port,host:port`, librdkafka's `bootstrap.servers`.
    pub servers: String,
    /// `kafka+ssl://`: TLS to every broker.
    pub tls: bool,
    pub sasl: SaslMechanism,
}

impl Bootstrap {
    /// Reads `kafka://h:p[,h:p…][?sasl=scram-sha-512]` or `kafka+ssl://…` (schemes without case).
    pub fn parse(url: &str) -> Result<Bootstrap, UrlError> {
        let scheme_err = || UrlError::Scheme { url: url.into() };
        let (scheme, rest) = url.split_once("://").ok_or_else(scheme_err)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "kafka" => false,
            "kafka+ssl" | "kafka+tls" => true,
            _ => return Err(scheme_err()),
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let hosts = hosts.trim_end_matches('/');
        let mut servers = Vec::new();
        for s in hosts.split(',').filter(|s| !s.is_empty()) {
            let ok = s
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok || s.contains('/') || s.contains('@') {
                return Err(UrlError::Server {
                    url: url.into(),
                    server: s.into(),
                });
            }
            servers.push(s);
        }
        if servers.is_empty() {
            return Err(UrlError::NoServer { url: url.into() });
        }
        let mut sasl = SaslMechanism::default();
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name != "sasl" {
                return Err(UrlError::Query {
                    url: url.into(),
                    name: name.into(),
                });
            }
            sasl = match value.to_ascii_lowercase().as_str() {
                "plain" => SaslMechanism::Plain,
                "scram-sha-256" => SaslMechanism::ScramSha256,
                "scram-sha-512" => SaslMechanism::ScramSha512,
                _ => {
                    return Err(UrlError::Sasl {
                        url: url.into(),
                        value: value.into(),
                    });
                }
            };
        }
        Ok(Bootstrap {
            servers: servers.join(","),
            tls,
            sasl,
        })
    }

    /// The librdkafka settings common to every Weir client of this cluster: where it is, TLS
    /// with the Secret's `ca.crt` (else the system's roots), SASL with its user and password.
    /// A `token` or NATS `creds` is no Kafka credential; a `ca.crt` beside a `kafka://` URL is
    /// refused (TLS was meant). Never holds anything but what the Secret gave.
    pub fn settings(
        &self,
        credentials: &Credentials,
    ) -> Result<BTreeMap<&'static str, String>, crate::credentials::CredentialsError> {
        use crate::credentials::CredentialsError;
        if credentials.ca.is_some() && !self.tls {
            return Err(CredentialsError(format!(
                "key {:?} is given but the URL is not TLS (use kafka+ssl://)",
                crate::credentials::CA_KEY
            )));
        }
        let mut s = BTreeMap::new();
        s.insert("bootstrap.servers", self.servers.clone());
        let sasl = match &credentials.auth {
            Auth::None => None,
            Auth::UserPassword { username, password } => Some((username, password)),
            Auth::Token(_) | Auth::Password(_) | Auth::Creds(_) => {
                return Err(CredentialsError(
                    "Kafka takes username and password (SASL), not a token or creds file".into(),
                ));
            }
        };
        let protocol = match (self.tls, sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        s.insert("security.protocol", protocol.into());
        if let Some(pem) = &credentials.ca {
            s.insert("ssl.ca.pem", pem.clone());
        }
        if let Some((user, password)) = sasl {
            s.insert("sasl.mechanism", self.sasl.name().into());
            s.insert("sasl.username", user.clone());
            s.insert("sasl.password", password.clone());
        }
        Ok(s)
    }

    /// [`settings`](Self::settings) as a librdkafka client configuration, for the caller to add
    /// its role's settings to (a producer's `acks`, a consumer's `group.id` …).
    pub fn client_config(
        &self,
        credentials: &Credentials,
    ) -> Result<ClientConfig, crate::credentials::CredentialsError> {
        let mut c = ClientConfig::new();
        for (k, v) in self.settings(credentials)? {
            c.set(k, v);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_underscores_and_scope_groups_by_queue() {
        let s = crate::queue::stream_name("shop", "orders");
        assert_eq!(topic(&s), "weir_shop_orders");
        assert_eq!(dead_letter_topic(&s), "weir_shop_orders_dlq");
        assert_eq!(group_id(&s, "billing"), "weir_shop_orders.billing");
    }

    #[test]
    fn urls_name_servers_tls_and_sasl() {
        let b = Bootstrap::parse("kafka://a:9092,b:9093").unwrap();
        assert_eq!(b.servers, "a:9092,b:9093");
        assert!(!b.tls);
        let b = Bootstrap::parse("KAFKA+SSL://k.example:9093/?sasl=SCRAM-SHA-512").unwrap();
        assert!(b.tls);
        assert_eq!(b.sasl, SaslMechanism::ScramSha512);
        assert_eq!(b.servers, "k.example:9093");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, want) in [
            ("nats://a:4222", "is not a Kafka URL"),
            ("kafka://", "names no bootstrap server"),
            ("kafka://a", "is not host:port"),
            ("kafka://a:0", "is not host:port"),
            ("kafka://u:p@a:9092", "is not host:port"),
            ("kafka://a:9092?sasl=gssapi", "is not one of plain"),
            ("kafka://a:9092?acks=0", "unknown query parameter \"acks\""),
        ] {
            let e = Bootstrap::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn settings_follow_the_secret() {
        let plain = Bootstrap::parse("kafka://a:9092").unwrap();
        let s = plain.settings(&Credentials::default()).unwrap();
        assert_eq!(s["security.protocol"], "plaintext");
        assert!(!s.contains_key("sasl.username"));

        let user = Credentials::from(Auth::UserPassword {
            username: "u".into(),
            password: "p".into(),
        });
        let s = plain.settings(&user).unwrap();
        assert_eq!(s["security.protocol"], "sasl_plaintext");
        assert_eq!(s["sasl.mechanism"], "PLAIN");

        let tls = Bootstrap::parse("kafka+ssl://a:9093?sasl=scram-sha-256").unwrap();
        let with_ca = Credentials {
            ca: Some("PEM".into()),
            ..user.clone()
        };
        let s = tls.settings(&with_ca).unwrap();
        assert_eq!(s["security.protocol"], "sasl_ssl");
        assert_eq!(s["sasl.mechanism"], "SCRAM-SHA-256");
        assert_eq!(s["ssl.ca.pem"], "PEM");

        let e = plain.settings(&with_ca).unwrap_err().to_string();
        assert!(e.contains("use kafka+ssl://"), "{e}");
        let e = plain
            .settings(&Credentials::from(Auth::Token("t".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("username and password"), "{e}");
    }
}

//! URLs fit to print: a broker URL may carry its credentials (`amqp://user:pass@host`,
//! `redis://:pass@host`, `nats://token@host`), and whatever prints or logs it (`weir up`, the
//! sidecar's log, a readiness message, a Queue's condition) must not show them. The real URL stays
//! in the configs handed to processes; only what a person or a log reads is masked.

/// `url` with its password replaced by `***` (`amqp://guest:***@host:5672/%2f`), or, when the
/// userinfo is a single part (a NATS token, `nats://s3cr3t@host`), that part replaced
/// (`nats://***@host`). A URL without userinfo is returned as it is.
pub fn url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first '/', '?' or '#'; its userinfo at the last '@' before it
    // (a password may itself contain '@' when a client was lenient about escaping).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{masked}@{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn a_password_is_masked_and_the_user_kept() {
        assert_eq!(
            url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("redis://:s3cret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            url("amqps://u:p@ss@broker:5671?heartbeat=5"),
            "amqps://u:***@broker:5671?heartbeat=5"
        );
    }

    #[test]
    fn a_token_alone_is_masked() {
        assert_eq!(
            url("nats://s3cr3t@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
    }

    #[test]
    fn a_url_without_credentials_is_unchanged() {
        for u in [
            "nats://127.0.0.1:4222",
            "amqp://127.0.0.1:5672/%2f",
            "http://host/path?x=a@b",
            "not a url",
        ] {
            assert_eq!(url(u), u);
        }
    }
}

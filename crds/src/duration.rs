//! Duration strings as users write them in manifests (`250ms`, `3s`, `1m30s`, `2h`).
//!
//! The CRD schema checks the shape with [`DURATION_PATTERN`]; [`parse`] turns a string into a
//! [`std::time::Duration`] for the operator and for `weir render`.

use std::time::Duration;

/// The regular expression the CRD schema uses for every duration field.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// The pattern of long durations (retention, ages), which may also count days: `30d`, `7d12h`.
pub const LONG_DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// Parses a long duration: as [`parse`], plus `d` (24h): `30d`, `7d12h`, `90m`.
pub fn parse_long(input: &str) -> Result<Duration, DurationError> {
    parse_units(input, true)
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 250ms, 3s, 1m30s)")]
pub struct DurationError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses `250ms`, `3s`, `1m30s`, `2h`: one or more number+unit pairs, units `ms`, `s`, `m`, `h`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    parse_units(input, false)
}

fn parse_units(input: &str, days: bool) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut i = 0;
    let mut total_ms: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(err("a number must come before each unit"));
        }
        let n: u128 = input[start..i]
            .parse()
            .map_err(|_| err("number too large"))?;
        let unit_ms: u128 = if input[i..].starts_with("ms") {
            i += 2;
            1
        } else if input[i..].starts_with('s') {
            i += 1;
            1_000
        } else if input[i..].starts_with('m') {
            i += 1;
            60_000
        } else if input[i..].starts_with('h') {
            i += 1;
            3_600_000
        } else if days && input[i..].starts_with('d') {
            i += 1;
            86_400_000
        } else if days {
            return Err(err("unit must be one of ms, s, m, h, d"));
        } else {
            return Err(err("unit must be one of ms, s, m, h"));
        };
        total_ms = total_ms
            .checked_add(n.checked_mul(unit_ms).ok_or_else(|| err("too large"))?)
            .ok_or_else(|| err("too large"))?;
    }
    let ms = u64::try_from(total_ms).map_err(|_| err("too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way [`parse`] reads it back (`1500ms`, `3s`, `2m`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("1s500ms").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn long_durations_count_days() {
        assert_eq!(parse_long("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_long("1d12h").unwrap(), Duration::from_secs(36 * 3600));
        assert_eq!(parse_long("90s").unwrap(), Duration::from_secs(90));
        assert!(parse("1d").is_err());
        assert!(parse_long("1w").is_err());
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "3",
            "s",
            "3x",
            "1.5s",
            "-1s",
            "3 s",
            "99999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [0u64, 1, 250, 1000, 1500, 60_000, 90_000, 3_600_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}

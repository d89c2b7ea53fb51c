//! The Prometheus text exposition the sidecars' `/metrics` answer, read into samples: enough
//! of the format for what the dashboard computes (counter rates between two scrapes, quantiles
//! from histogram buckets). Comments, `# EOF` and exemplars are skipped.

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether every `(label, value)` of `filter` matches.
    pub fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// Parses an exposition; lines that do not parse are skipped (a scrape is best effort).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // Skip separators, then `}` or a label name.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(i, c) = chars.peek()?;
            if c == '}' {
                end = i + 1;
                break;
            }
            let start = i;
            let mut eq = None;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(j);
                    break;
                }
            }
            let key = after[start..eq?].trim().to_string();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
        rest = &after[end..];
    }
    // The value, then an optional timestamp, then an optional exemplar (` # {...} v`).
    let rest = rest.split(" # ").next().unwrap_or("");
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The sum of the samples called `name` that match `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.matches(filter))
        .map(|s| s.value)
        // `+ 0.0`: the empty sum is -0.0, which would print as such.
        .sum::<f64>()
        + 0.0
}

/// The largest value of the samples called `name` that match `filter`, if any.
pub fn max(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && s.matches(filter))
        .map(|s| s.value)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
}

/// The cumulative buckets `(le, count)` of histogram `name` (without `_bucket`) over the
/// samples matching `filter`, summed per bound, sorted by bound.
pub fn buckets(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in samples
        .iter()
        .filter(|s| s.name == bucket && s.matches(filter))
    {
        let Some(le) = s.label("le").and_then(parse_value) else {
            continue;
        };
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += s.value,
            None => out.push((le, s.value)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile (0..=1) of cumulative buckets, interpolated linearly within the bucket as
/// Prometheus' `histogram_quantile` does; `None` without observations. In the `+Inf` bucket
/// it answers the largest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// Bucket counts of `now` minus those of `before` (a counter that went down was reset: its
/// current count is the increase).
pub fn bucket_increase(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
            (le, increase(c, b))
        })
        .collect()
}

/// A counter's increase from `before` to `now`, a reset counted from zero.
pub fn increase(now: f64, before: f64) -> f64 {
    if now >= before { now - before } else { now }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP weir_requests Requests answered.
# TYPE weir_requests counter
weir_requests_total{direction="outbound",dependency="users",status_class="2xx"} 7
weir_requests_total{direction="outbound",dependency="users",status_class="5xx"} 3
weir_requests_total{direction="inbound",dependency="",status_class="2xx"} 10 1700000000000
# TYPE weir_circuit_breaker_state gauge
weir_circuit_breaker_state{dependency="users"} 1
weir_spans_dropped_total 0
odd{msg="a \"quoted\" \\ value, with } and ,",x="y"} 2.5e1
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="0.1"} 5 # {trace_id="abc"} 0.05
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="1.0"} 7
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="+Inf"} 7
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="5xx",le="0.1"} 0
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="5xx",le="1.0"} 1
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="5xx",le="+Inf"} 3
not a sample
# EOF
"#;

    #[test]
    fn samples_labels_escapes_timestamps_and_exemplars() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 12, "{s:#?}");
        assert_eq!(s[0].name, "weir_requests_total");
        assert_eq!(s[0].label("dependency"), Some("users"));
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[2].value, 10.0, "the timestamp is not the value");
        assert_eq!(s[4].labels, vec![]);
        assert_eq!(
            s[5].label("msg"),
            Some(r#"a "quoted" \ value, with } and ,"#)
        );
        assert_eq!(s[5].label("x"), Some("y"));
        assert_eq!(s[5].value, 25.0);
        assert_eq!(s[6].value, 5.0, "the exemplar is not the value");
        assert!(s[8].label("le") == Some("+Inf"));
    }

    #[test]
    fn sums_maxima_and_filters() {
        let s = parse(TEXT);
        let out = [("direction", "outbound"), ("dependency", "users")];
        assert_eq!(sum(&s, "weir_requests_total", &out), 10.0);
        assert_eq!(
            sum(
                &s,
                "weir_requests_total",
                &[("dependency", "users"), ("status_class", "5xx")]
            ),
            3.0
        );
        assert_eq!(
            sum(&s, "weir_requests_total", &[("dependency", "nope")]),
            0.0
        );
        assert_eq!(
            max(&s, "weir_circuit_breaker_state", &[("dependency", "users")]),
            Some(1.0)
        );
        assert_eq!(
            max(&s, "weir_circuit_breaker_state", &[("dependency", "x")]),
            None
        );
    }

    #[test]
    fn histogram_buckets_summed_and_quantiles_interpolated() {
        let s = parse(TEXT);
        let b = buckets(
            &s,
            "weir_request_duration_seconds",
            &[("dependency", "users")],
        );
        assert_eq!(b, vec![(0.1, 5.0), (1.0, 8.0), (f64::INFINITY, 10.0)]);
        // The median: rank 5 of 10, the end of the first bucket.
        assert_eq!(quantile(0.5, &b), Some(0.1));
        // p70: rank 7, two of the three in (0.1, 1.0]: 0.1 + 0.9 * 2/3.
        let p70 = quantile(0.7, &b).unwrap();
        assert!((p70 - 0.7).abs() < 1e-9, "{p70}");
        // p99 falls in +Inf: the largest finite bound.
        assert_eq!(quantile(0.99, &b), Some(1.0));
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[]), None);
    }

    #[test]
    fn increases_between_scrapes_and_after_a_reset() {
        assert_eq!(increase(10.0, 4.0), 6.0);
        assert_eq!(
            increase(3.0, 40.0),
            3.0,
            "a restarted sidecar counts from 0"
        );
        let before = vec![(0.1, 5.0), (1.0, 6.0), (f64::INFINITY, 6.0)];
        let now = vec![(0.1, 5.0), (1.0, 9.0), (f64::INFINITY, 10.0)];
        let d = bucket_increase(&now, &before);
        assert_eq!(d, vec![(0.1, 0.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
        // p50 of the window: rank 2 of 4, within (0.1, 1.0].
        let p50 = quantile(0.5, &d).unwrap();
        assert!(p50 > 0.1 && p50 < 1.0, "{p50}");
    }
}

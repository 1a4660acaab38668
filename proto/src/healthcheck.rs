//! HEALTHCHECK options as Docker stores them: durations in nanoseconds (written as Go
//! durations, `30s`, `1m30s`, `500ms`) and a retry count.

/// A HEALTHCHECK's options, parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthcheckOptions {
    /// `--interval`, ns.
    pub interval: Option<i64>,
    /// `--timeout`, ns.
    pub timeout: Option<i64>,
    /// `--start-period`, ns.
    pub start_period: Option<i64>,
    /// `--start-interval`, ns.
    pub start_interval: Option<i64>,
    /// `--retries`.
    pub retries: Option<i64>,
}

/// Why a HEALTHCHECK option is refused; the words are the error's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthcheckError {
    /// Not a duration.
    #[error("--{flag}={value} is not a duration: write e.g. 30s, 1m30s or 500ms")]
    Duration {
        /// The flag.
        flag: String,
        /// As written.
        value: String,
    },
    /// A duration Docker refuses (negative, or below its 1ms minimum).
    #[error("--{flag}={value} is too short: Docker needs 1ms or more (or 0 for the default)")]
    TooShort {
        /// The flag.
        flag: String,
        /// As written.
        value: String,
    },
    /// Not a count.
    #[error("--retries={0} is not a whole number of retries")]
    Retries(String),
}

/// A Go duration (`1h2m3.5s`, `300ms`, `0`) in nanoseconds.
pub fn duration_ns(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut rest = s;
    let mut total: f64 = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return None;
        }
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    (total <= i64::MAX as f64).then_some(total.round() as i64)
}

/// Parses the options of a HEALTHCHECK as written (`interval`, `30s`), as Docker checks them.
pub fn parse_options(options: &[(String, String)]) -> Result<HealthcheckOptions, HealthcheckError> {
    let mut o = HealthcheckOptions::default();
    for (flag, value) in options {
        if flag == "retries" {
            let n: i64 = value
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| HealthcheckError::Retries(value.clone()))?;
            o.retries = Some(n);
            continue;
        }
        let ns = duration_ns(value).ok_or_else(|| HealthcheckError::Duration {
            flag: flag.clone(),
            value: value.clone(),
        })?;
        if ns != 0 && ns < 1_000_000 {
            return Err(HealthcheckError::TooShort {
                flag: flag.clone(),
                value: value.clone(),
            });
        }
        let slot = match flag.as_str() {
            "interval" => &mut o.interval,
            "timeout" => &mut o.timeout,
            "start-period" => &mut o.start_period,
            _ => &mut o.start_interval,
        };
        *slot = Some(ns);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_read_as_docker_reads_them() {
        assert_eq!(duration_ns("30s"), Some(30_000_000_000));
        assert_eq!(duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(duration_ns("500ms"), Some(500_000_000));
        assert_eq!(duration_ns("1.5h"), Some(5_400_000_000_000));
        assert_eq!(duration_ns("0"), Some(0));
        for bad in ["", "30", "s", "3x", "1m-2s", "."] {
            assert_eq!(duration_ns(bad), None, "{bad}");
        }
    }

    #[test]
    fn options_are_checked() {
        let o = parse_options(&[("interval".into(), "5s".into()), ("retries".into(), "3".into())]).unwrap();
        assert_eq!(o.interval, Some(5_000_000_000));
        assert_eq!(o.retries, Some(3));
        assert!(matches!(
            parse_options(&[("timeout".into(), "soon".into())]),
            Err(HealthcheckError::Duration { .. })
        ));
        assert!(matches!(
            parse_options(&[("timeout".into(), "10us".into())]),
            Err(HealthcheckError::TooShort { .. })
        ));
        assert!(parse_options(&[("retries".into(), "x".into())]).is_err());
    }
}

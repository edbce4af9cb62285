//! The one duration syntax: a whole number and a unit, `500ms`, `5s`, `2m` or `1h`
//! ([`PATTERN`]). The CRD's `spec.delivery.*` durations and the duration flags of
//! `pacer run` (`--timeout`, `--retry-initial-delay`, `--retry-max-delay`,
//! `--shutdown-grace`) accept exactly this.
//!
//! `pacer run` used to accept more: fractions (`1.5s`), a bare number meaning seconds
//! (`30`) and surrounding spaces. The CRD's syntax won: it is the published API, Kubernetes
//! CEL's `duration()` understands it, and a unit is never implied (`30` is 30 seconds to
//! one reader and 30 milliseconds to the next).

use std::time::Duration;

/// The syntax as a regular expression, for the CRD schema.
pub const PATTERN: &str = r"^[0-9]{1,9}(ms|s|m|h)$";

/// The longest text [`PATTERN`] matches (nine digits and `ms`): the CRD's `maxLength`,
/// which also bounds the cost the API server estimates for a CEL rule that reads it.
pub const MAX_LEN: usize = 11;

/// Examples quoted in error messages.
const EXAMPLES: &str = "500ms, 5s or 1m";

/// Parses the syntax of [`PATTERN`]; `None` for anything else.
pub fn parse(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    // At most 9 digits, as the CRD's pattern: no overflow below, whatever the unit.
    if digits.is_empty() || digits.len() > 9 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// Writes a duration in the same syntax, in the largest unit that is exact (`90s`,
/// `2m`, `250ms`), so messages quote values the way a user writes them.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// The durations a setting accepts: zero or not, and the longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    /// Whether zero is refused.
    pub positive: bool,
    pub max: Duration,
}

impl DurationRange {
    /// Parses and checks `text`: `"0s" is not a positive duration like 500ms, 5s or 1m,
    /// at most 24h`.
    pub fn check(self, text: &str) -> Result<Duration, String> {
        parse(text)
            .filter(|d| !(self.positive && d.is_zero()) && *d <= self.max)
            .ok_or_else(|| {
                let positive = if self.positive { "positive " } else { "" };
                format!(
                    "{text:?} is not a {positive}duration like {EXAMPLES}, at most {}",
                    format(self.max)
                )
            })
    }
}

/// Longest sink timeout or retry delay. `pacer run` used to accept up to a year; a day is
/// already far beyond any useful value and keeps CEL's `duration()` in range.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// One sink call: `spec.delivery.timeout` and `--timeout`. A zero timeout would fail
/// every call.
pub const TIMEOUT: DurationRange = DurationRange {
    positive: true,
    max: MAX_DELAY,
};

/// A retry delay: `spec.delivery.retry.{initialDelay,maxDelay}` and
/// `--retry-{initial,max}-delay`. Zero retries at once.
pub const RETRY_DELAY: DurationRange = DurationRange {
    positive: false,
    max: MAX_DELAY,
};

/// Time to finish in-flight work on shutdown: `spec.delivery.shutdownGrace` and
/// `--shutdown-grace`. `pacer run` used to accept up to a year; the operator's hour won
/// (the pods' termination grace period is this plus 5 seconds, and an hour-long shutdown
/// already blocks a rolling update for that long).
pub const SHUTDOWN_GRACE: DurationRange = DurationRange {
    positive: false,
    max: Duration::from_secs(3600),
};

/// The first retry delay may not be longer than the largest; `max_field` is that
/// setting's name as the caller's user spells it (`maxDelay`, `--retry-max-delay`).
pub fn retry_delays(initial: Duration, max: Duration, max_field: &str) -> Result<(), String> {
    if initial <= max {
        Ok(())
    } else {
        Err(format!(
            "{} must not be longer than {max_field} ({})",
            format(initial),
            format(max)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_len_is_the_longest_duration_the_pattern_takes() {
        let longest = "999999999ms";
        assert_eq!(longest.len(), MAX_LEN);
        assert!(parse(longest).is_some());
        assert_eq!(parse("9999999999s"), None, "ten digits");
    }

    #[test]
    fn durations_take_one_whole_number_and_one_unit() {
        assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("0s"), Some(Duration::ZERO));
        assert_eq!(
            parse("999999999h"),
            Some(Duration::from_secs(999_999_999 * 3600))
        );
        for bad in [
            "",
            "s",
            "5",
            "30",
            "1.5s",
            "5 s",
            " 5s",
            "5s ",
            "-1s",
            "+1s",
            "1d",
            "1s2ms",
            "5S",
            "1234567890s",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatting_uses_the_largest_exact_unit_and_parses_back() {
        for (ms, text) in [
            (0, "0s"),
            (250, "250ms"),
            (1500, "1500ms"),
            (5000, "5s"),
            (90_000, "90s"),
            (120_000, "2m"),
            (86_400_000, "24h"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Some(d));
        }
    }

    #[test]
    fn each_range_accepts_its_edges_and_refuses_just_outside() {
        assert!(TIMEOUT.check("1ms").is_ok());
        assert!(TIMEOUT.check("24h").is_ok());
        assert!(TIMEOUT.check("86400000ms").is_ok());
        assert!(RETRY_DELAY.check("0ms").is_ok());
        assert!(SHUTDOWN_GRACE.check("0s").is_ok());
        assert!(SHUTDOWN_GRACE.check("3600s").is_ok());
        assert_eq!(
            TIMEOUT.check("0s").unwrap_err(),
            r#""0s" is not a positive duration like 500ms, 5s or 1m, at most 24h"#
        );
        assert_eq!(
            TIMEOUT.check("86400001ms").unwrap_err(),
            r#""86400001ms" is not a positive duration like 500ms, 5s or 1m, at most 24h"#
        );
        assert_eq!(
            RETRY_DELAY.check("1441m").unwrap_err(),
            r#""1441m" is not a duration like 500ms, 5s or 1m, at most 24h"#
        );
        assert_eq!(
            SHUTDOWN_GRACE.check("3601s").unwrap_err(),
            r#""3601s" is not a duration like 500ms, 5s or 1m, at most 1h"#
        );
    }

    #[test]
    fn the_first_retry_delay_may_equal_but_not_exceed_the_largest() {
        let s = Duration::from_secs;
        assert!(retry_delays(s(10), s(10), "maxDelay").is_ok());
        assert_eq!(
            retry_delays(s(60), s(30), "maxDelay").unwrap_err(),
            "1m must not be longer than maxDelay (30s)"
        );
    }
}

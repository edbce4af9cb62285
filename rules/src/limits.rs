//! Numeric bounds of the settings that more than one place accepts: the CRD
//! (`spec.budget.*`, `spec.delivery.retry.maxAttempts`), the standalone coordinator's
//! budgets file and the flags of `pacer run`.
//!
//! Each setting is a module with `MIN` and `MAX` constants (plain paths, so the CRD's
//! `#[schemars(range(...))]` attributes can name them) and a `RANGE` that checks a value.
//! Where two places used to disagree, the comment on the module says which value won and
//! why.

use std::fmt;

/// An inclusive range of whole numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntRange {
    pub min: i64,
    pub max: i64,
}

impl IntRange {
    pub fn contains(self, value: i64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    /// `value` if it is in range, else why not: `0 is out of range, must be 1 to 10000`.
    pub fn check(self, value: i64) -> Result<i64, String> {
        if self.contains(value) {
            Ok(value)
        } else {
            Err(format!("{value} is out of range, must be {self}"))
        }
    }

    /// Parses a whole number written in decimal and checks it (for flags and env vars).
    pub fn parse(self, text: &str) -> Result<i64, String> {
        let value = text
            .parse::<i64>()
            .map_err(|_| format!("{text:?} is not a whole number, must be {self}"))?;
        self.check(value)
    }
}

impl fmt::Display for IntRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.min, self.max)
    }
}

/// Messages per second: the global budget (`messagesPerSecond` in the CRD and the budgets
/// file) and a standalone replica's `--rate`.
pub mod rate {
    /// Rates must be strictly greater than this.
    pub const ABOVE: f64 = 0.0;
    /// The CRD's bound. `pacer run --rate` used to accept up to 1e9 and the budgets file
    /// had no bound; a million messages per second is far beyond what one budget of
    /// handler calls means in production, and `--rate unlimited` remains for "no limit".
    pub const MAX: f64 = 1_000_000.0;

    /// `value` if it is greater than 0 and at most [`MAX`] (NaN and infinity are not).
    pub fn check(value: f64) -> Result<f64, String> {
        if value > ABOVE && value <= MAX {
            Ok(value)
        } else {
            Err(format!(
                "{value} is out of range, must be greater than {ABOVE} and at most {MAX}"
            ))
        }
    }
}

/// Messages in flight: the global budget (`maxInFlight`) and `--max-in-flight`. The budgets
/// file used to accept up to 4294967295; the CRD's and the runtime's 100000 won.
pub mod max_in_flight {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 100_000;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
}

/// Per-replica token-bucket burst: `spec.budget.burst` and `--burst`. `pacer run` used to
/// accept up to 1000000; the CRD's 10000 won (the published API, and a burst of more than
/// ten thousand messages at once defeats the rate limit it belongs to).
pub mod burst {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 10_000;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
}

/// Lease length in seconds: `leaseSeconds` in the CRD and the budgets file.
pub mod lease_seconds {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 3600;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
}

/// How long a member whose lease expired without a refresh may run on its fallback
/// share: `fallbackSeconds` in the CRD and the budgets file. The coordinator gives a
/// silent member's share to the others only after its lease and this window, because it
/// cannot tell a crashed member from one cut off from it; 0 trades that safety margin for
/// the fastest reclaim (a member cut off stops taking messages when its lease expires).
pub mod fallback_seconds {
    pub const MIN: i64 = 0;
    pub const MAX: i64 = 86_400;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
    /// Leases in the default window: 30 s at the default 10 s lease.
    pub const DEFAULT_LEASES: i64 = 3;

    /// The window when none is set.
    pub fn default_for(lease_seconds: i64) -> i64 {
        DEFAULT_LEASES * lease_seconds
    }
}

/// Refresh interval in milliseconds: `refreshMillis` in the CRD and the budgets file. The
/// file used to accept down to 50; the CRD's 100 won: every replica calls the coordinator
/// once per refresh, and ten calls a second per replica is already plenty.
pub mod refresh_millis {
    pub const MIN: i64 = 100;
    pub const MAX: i64 = 600_000;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
}

/// A lease must last longer than this many refresh intervals, so that one lost refresh
/// does not let it expire.
pub const REFRESHES_PER_LEASE: i64 = 2;

/// Checks `leaseSeconds` against `refreshMillis` (the names are the same in the CRD and
/// the budgets file).
pub fn lease_outlives_refreshes(lease_seconds: i64, refresh_millis: i64) -> Result<(), String> {
    let lease_ms = lease_seconds.saturating_mul(1000);
    let refreshes_ms = refresh_millis.saturating_mul(REFRESHES_PER_LEASE);
    if lease_ms > refreshes_ms {
        Ok(())
    } else {
        Err(format!(
            "leaseSeconds * 1000 ({lease_ms}) must be greater than {REFRESHES_PER_LEASE} * refreshMillis ({refreshes_ms}) so a lease survives a missed refresh"
        ))
    }
}

/// Delivery attempts per message: `spec.delivery.retry.maxAttempts` and `--max-attempts`.
/// `pacer run` used to accept up to 1000000; the CRD's 1000 won (with exponential backoff
/// capped at the largest retry delay, a thousand attempts already take hours).
pub mod max_attempts {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 1000;
    pub const RANGE: super::IntRange = super::IntRange { min: MIN, max: MAX };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_accepts_both_edges_and_refuses_just_outside_them() {
        let r = burst::RANGE;
        assert_eq!(r.check(1), Ok(1));
        assert_eq!(r.check(10_000), Ok(10_000));
        assert_eq!(
            r.check(0).unwrap_err(),
            "0 is out of range, must be 1 to 10000"
        );
        assert_eq!(
            r.check(10_001).unwrap_err(),
            "10001 is out of range, must be 1 to 10000"
        );
    }

    #[test]
    fn a_range_parses_decimal_whole_numbers_only() {
        let r = max_in_flight::RANGE;
        assert_eq!(r.parse("100000"), Ok(100_000));
        assert_eq!(
            r.parse("0").unwrap_err(),
            "0 is out of range, must be 1 to 100000"
        );
        for bad in ["", "1.0", "ten", " 5", "0x10"] {
            assert_eq!(
                r.parse(bad).unwrap_err(),
                format!("{bad:?} is not a whole number, must be 1 to 100000")
            );
        }
    }

    #[test]
    fn rates_are_greater_than_zero_and_at_most_a_million() {
        for ok in [f64::MIN_POSITIVE, 0.5, 1.0, rate::MAX] {
            assert_eq!(rate::check(ok), Ok(ok));
        }
        for bad in [0.0, -0.0, -1.0, 1_000_000.5, f64::INFINITY, f64::NAN] {
            assert!(rate::check(bad).is_err(), "{bad}");
        }
        assert_eq!(
            rate::check(2e6).unwrap_err(),
            "2000000 is out of range, must be greater than 0 and at most 1000000"
        );
    }

    #[test]
    fn a_lease_must_outlive_two_refreshes() {
        assert!(lease_outlives_refreshes(1, 499).is_ok());
        assert_eq!(
            lease_outlives_refreshes(1, 500).unwrap_err(),
            "leaseSeconds * 1000 (1000) must be greater than 2 * refreshMillis (1000) so a lease survives a missed refresh"
        );
        assert!(lease_outlives_refreshes(i64::MAX, i64::MAX).is_err());
    }

    #[test]
    fn every_range_is_non_empty_and_positive() {
        for r in [
            max_in_flight::RANGE,
            burst::RANGE,
            lease_seconds::RANGE,
            refresh_millis::RANGE,
            max_attempts::RANGE,
        ] {
            assert!(1 <= r.min && r.min <= r.max, "{r}");
        }
        // The smallest lease and the smallest refresh must fit together, or no budget
        // could use the smallest lease.
        assert!(lease_outlives_refreshes(lease_seconds::MIN, refresh_millis::MIN).is_ok());
    }
}

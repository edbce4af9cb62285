//! librdkafka's own log lines, forwarded to `tracing` (target `librdkafka`) with
//! repeats held back: a rebalance or an unreachable broker makes librdkafka repeat one
//! warning many times (61 `COMMITFAIL` lines in 10 s of the demo at 5,000 msg/s before
//! this), which buries everything else a user needs from the log.
//!
//! The rule (pure, time passed in): per facility (`COMMITFAIL`, `FAIL`, ...), the first
//! warning or error of a [`WINDOW`] is logged; later ones in the window are counted, and
//! the first one after the window is logged with how many were held back. Info and debug
//! lines are forwarded as they come (they are filtered by level anyway).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use tracing::{debug, error, info, warn};

/// How long repeats of one facility's warnings are held back after one was logged.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `held_back` lines of its facility were dropped since the last one logged.
    Log { held_back: u64 },
    /// Drop it (counted).
    HoldBack,
}

/// Per-facility repeat suppression.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// Facility -> (when its last line was logged, lines held back since).
    last: HashMap<String, (Instant, u64)>,
}

impl LogThrottle {
    pub fn verdict(&mut self, facility: &str, now: Instant) -> Verdict {
        match self.last.get_mut(facility) {
            Some((at, held)) if now.duration_since(*at) < WINDOW => {
                *held += 1;
                Verdict::HoldBack
            }
            Some((at, held)) => {
                let held_back = std::mem::take(held);
                *at = now;
                Verdict::Log { held_back }
            }
            None => {
                self.last.insert(facility.to_string(), (now, 0));
                Verdict::Log { held_back: 0 }
            }
        }
    }
}

/// Forwards one librdkafka line through `throttle` (warnings and worse only).
pub fn forward(
    throttle: &std::sync::Mutex<LogThrottle>,
    level: RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    let serious = matches!(
        level,
        RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning
    );
    let held_back = if serious {
        let verdict = throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .verdict(fac, Instant::now());
        match verdict {
            Verdict::HoldBack => return,
            Verdict::Log { held_back } => held_back,
        }
    } else {
        0
    };
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            error!(target: "librdkafka", facility = fac, held_back, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            warn!(target: "librdkafka", facility = fac, held_back, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_of_a_facility_are_held_back_for_a_window_then_counted_in_the_next_line() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(t.verdict("COMMITFAIL", t0), Verdict::Log { held_back: 0 });
        for i in 1..=60 {
            assert_eq!(
                t.verdict("COMMITFAIL", ms(i * 100)),
                Verdict::HoldBack,
                "{i}"
            );
        }
        // Another facility has its own window.
        assert_eq!(t.verdict("FAIL", ms(500)), Verdict::Log { held_back: 0 });
        // After the window: logged, with the count of what was held back.
        assert_eq!(
            t.verdict("COMMITFAIL", ms(10_000 + 100)),
            Verdict::Log { held_back: 60 }
        );
        assert_eq!(t.verdict("COMMITFAIL", ms(10_200)), Verdict::HoldBack);
        assert_eq!(
            t.verdict("COMMITFAIL", ms(30_000)),
            Verdict::Log { held_back: 1 }
        );
    }
}

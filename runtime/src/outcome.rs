//! What to do after a sink attempt: the delivery policy as one pure function.
//!
//! | attempt result                | decision                                                |
//! |-------------------------------|---------------------------------------------------------|
//! | 2xx / produced / written      | ack                                                     |
//! | 429, 503                      | back-pressure: wait `Retry-After` (or backoff), retry;  |
//! |                               | does not use up attempts                                |
//! | other 4xx (and 1xx/3xx)       | permanent: dead-letter, or hold (retry at max delay)    |
//! |                               | when there is no dead-letter topic                      |
//! | 5xx, timeout, transport error | retry with exponential backoff and jitter; after        |
//! |                               | `max_attempts`: dead-letter, or keep retrying at the    |
//! |                               | capped delay when there is no dead-letter topic         |
//!
//! No message is ever skipped: without a dead-letter topic it is retried until it
//! succeeds (and holds its partition's committed offset meanwhile). No I/O here; the
//! jitter is passed in.

use std::time::Duration;

use crate::config::RetryPolicy;

/// Longest `Retry-After` honoured; a server asking for more gets this, so a wrong header
/// cannot park a message for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The result of one sink attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Delivered (2xx, produced, written).
    Delivered,
    /// An HTTP status other than 2xx, with its `Retry-After` if any.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within `--timeout`.
    Timeout,
    /// Connection refused/reset, DNS, produce error...
    Transport(String),
}

/// Why a message is retried (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    BackPressure,
    Failure,
    /// Permanent failure with no dead-letter topic: held, never skipped.
    Held,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::BackPressure => "back_pressure",
            RetryReason::Failure => "failure",
            RetryReason::Held => "held",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Ack,
    Retry {
        after: Duration,
        reason: RetryReason,
        /// Whether this attempt counts towards `max_attempts`.
        counts: bool,
    },
    DeadLetter {
        error: String,
    },
}

impl Attempt {
    /// A short description for logs and the dead-letter error header.
    pub fn describe(&self) -> String {
        match self {
            Attempt::Delivered => "delivered".into(),
            Attempt::Status { code, .. } => format!("HTTP {code}"),
            Attempt::Timeout => "timeout".into(),
            Attempt::Transport(e) => e.clone(),
        }
    }
}

/// Decides what follows attempt number `attempt` (1-based, counting only attempts that
/// count). `jitter` is uniform in `[0, 1)`.
pub fn decide(
    result: &Attempt,
    attempt: u32,
    policy: &RetryPolicy,
    has_dead_letter: bool,
    jitter: f64,
) -> Decision {
    let permanent = |error: String| {
        if has_dead_letter {
            Decision::DeadLetter { error }
        } else {
            Decision::Retry {
                after: policy.max_delay,
                reason: RetryReason::Held,
                counts: false,
            }
        }
    };
    match result {
        Attempt::Delivered => Decision::Ack,
        Attempt::Status { code, .. } if (200..300).contains(code) => Decision::Ack,
        Attempt::Status {
            code: 429 | 503,
            retry_after,
        } => Decision::Retry {
            after: retry_after
                .map(|d| d.min(MAX_RETRY_AFTER))
                .unwrap_or_else(|| backoff(attempt, policy, jitter)),
            reason: RetryReason::BackPressure,
            counts: false,
        },
        Attempt::Status { code, .. } if !(500..600).contains(code) => permanent(result.describe()),
        Attempt::Status { .. } | Attempt::Timeout | Attempt::Transport(_) => {
            if attempt >= policy.max_attempts && has_dead_letter {
                Decision::DeadLetter {
                    error: result.describe(),
                }
            } else {
                Decision::Retry {
                    after: backoff(attempt, policy, jitter),
                    reason: RetryReason::Failure,
                    counts: true,
                }
            }
        }
    }
}

/// Exponential backoff with "equal jitter": half of `initial * 2^(attempt-1)` (capped at
/// `max_delay`) plus a random part of the other half, so retries of many messages that
/// failed together spread out, but never wait less than half the nominal delay.
pub fn backoff(attempt: u32, policy: &RetryPolicy, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(40);
    let nominal = policy
        .initial_delay
        .saturating_mul(1u32 << exp.min(31))
        .min(policy.max_delay);
    let half = nominal / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Parses `Retry-After`: delta-seconds. (HTTP-dates are rare from services throttling a
/// consumer; they are ignored and the backoff applies.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(10),
    };

    fn status(code: u16) -> Attempt {
        Attempt::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn a_2xx_is_acked() {
        assert_eq!(decide(&status(204), 1, &POLICY, true, 0.5), Decision::Ack);
        assert_eq!(
            decide(&Attempt::Delivered, 1, &POLICY, false, 0.5),
            Decision::Ack
        );
    }

    #[test]
    fn a_429_waits_for_retry_after_without_using_up_attempts() {
        let r = Attempt::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            decide(&r, 99, &POLICY, true, 0.5),
            Decision::Retry {
                after: Duration::from_secs(1),
                reason: RetryReason::BackPressure,
                counts: false
            }
        );
    }

    #[test]
    fn a_huge_retry_after_is_capped() {
        let r = Attempt::Status {
            code: 503,
            retry_after: Some(Duration::from_secs(86_400)),
        };
        assert!(
            matches!(decide(&r, 1, &POLICY, true, 0.0), Decision::Retry { after, .. } if after == MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn a_400_goes_to_the_dead_letter_topic_at_once() {
        assert_eq!(
            decide(&status(400), 1, &POLICY, true, 0.5),
            Decision::DeadLetter {
                error: "HTTP 400".into()
            }
        );
    }

    #[test]
    fn a_400_without_a_dead_letter_topic_is_held_not_skipped() {
        assert!(matches!(
            decide(&status(400), 1, &POLICY, false, 0.5),
            Decision::Retry {
                reason: RetryReason::Held,
                ..
            }
        ));
    }

    #[test]
    fn a_5xx_is_retried_until_max_attempts_then_dead_lettered() {
        assert!(matches!(
            decide(&status(500), 2, &POLICY, true, 0.5),
            Decision::Retry {
                reason: RetryReason::Failure,
                counts: true,
                ..
            }
        ));
        assert!(matches!(
            decide(&Attempt::Timeout, 3, &POLICY, true, 0.5),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn without_a_dead_letter_topic_failures_retry_forever() {
        for attempt in [3, 10, 1000, u32::MAX] {
            assert!(matches!(
                decide(&Attempt::Transport("refused".into()), attempt, &POLICY, false, 0.5),
                Decision::Retry { after, .. } if after <= POLICY.max_delay
            ));
        }
    }

    #[test]
    fn retry_after_parses_delta_seconds_only() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    proptest! {
        #[test]
        fn backoff_grows_stays_within_half_and_full_nominal_and_never_exceeds_the_cap(
            attempt in 1u32..100, jitter in 0.0f64..1.0,
        ) {
            let d = backoff(attempt, &POLICY, jitter);
            let nominal = POLICY.initial_delay.saturating_mul(1u32 << (attempt - 1).min(31)).min(POLICY.max_delay);
            prop_assert!(d >= nominal / 2 && d <= nominal);
            prop_assert!(d <= POLICY.max_delay);
        }

        #[test]
        fn every_status_code_has_a_decision_and_only_2xx_acks(code in 100u16..600, attempt in 1u32..10, dlq: bool) {
            let d = decide(&status(code), attempt, &POLICY, dlq, 0.3);
            prop_assert_eq!(d == Decision::Ack, (200..300).contains(&code));
            let dead_lettered = matches!(d, Decision::DeadLetter { .. });
            prop_assert!(dlq || !dead_lettered);
        }
    }
}

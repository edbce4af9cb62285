//! Validation of a `ThrottledConsumer` spec: pure, no I/O.
//!
//! The CRD schema and its CEL rules refuse most bad specs at `kubectl apply`, but an
//! object can predate a CRD upgrade or come through a server without CEL, so the
//! operator checks everything again here, in the same words. Every problem is reported
//! at once, each naming the field, the value and what is accepted; the reconciler puts
//! the message in the `InvalidSpec` condition and leaves the running Deployment alone.

use std::fmt;
use std::time::Duration;

use crate::crd::{BudgetPolicy, Ordering, ThrottledConsumerSpec};

/// One field that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.budget.maxInFlight`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec. Displayed as the `InvalidSpec` condition's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec(pub Vec<FieldError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidSpec {}

/// A spec that passed validation, with its durations parsed. Builders take this, so they
/// never see an unchecked value.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub spec: ThrottledConsumerSpec,
    pub timeout: Duration,
    pub shutdown_grace: Duration,
}

impl ValidSpec {
    /// Replicas the Deployment should run: zero while paused.
    pub fn desired_replicas(&self) -> i32 {
        if self.spec.paused {
            0
        } else {
            self.spec.replicas
        }
    }
}

// Bounds shared with the CRD schema (crd.rs); a unit test keeps both in step.
pub const MAX_REPLICAS: i32 = 1000;
pub const MAX_MESSAGES_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_IN_FLIGHT: i32 = 100_000;
pub const MAX_BURST: i32 = 10_000;
pub const LEASE_SECONDS: (i32, i32) = (1, 3600);
pub const REFRESH_MILLIS: (i32, i32) = (100, 600_000);
pub const MAX_ATTEMPTS: i32 = 1000;

/// Checks a spec. Pure; mirrors the CRD's bounds, patterns and CEL rules.
pub fn validate(spec: &ThrottledConsumerSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.to_string(),
            message,
        })
    };

    if !(0..=MAX_REPLICAS).contains(&spec.replicas) {
        err(
            "spec.replicas",
            format!(
                "{} is out of range, must be 0 to {MAX_REPLICAS}",
                spec.replicas
            ),
        );
    }

    // Kafka.
    let k = &spec.kafka;
    if k.bootstrap_servers.trim().is_empty() {
        err(
            "spec.kafka.bootstrapServers",
            "must not be empty, e.g. kafka:9092".into(),
        );
    }
    if k.topics.is_empty() {
        err("spec.kafka.topics", "must name at least one topic".into());
    }
    for (i, t) in k.topics.iter().enumerate() {
        if !is_topic_name(t) {
            err(
                &format!("spec.kafka.topics[{i}]"),
                format!("{t:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"),
            );
        }
    }
    if k.group_id.trim().is_empty() || k.group_id.len() > 255 {
        err(
            "spec.kafka.groupId",
            "must be 1 to 255 characters".to_string(),
        );
    }
    for (key, value) in &k.config {
        if key.is_empty() || key.contains(',') || key.contains('=') || value.contains(',') {
            err(
                &format!("spec.kafka.config[{key:?}]"),
                "keys may not be empty or contain ',' or '=' and values may not contain ','".into(),
            );
        }
    }
    for (i, s) in k.secret_config.iter().enumerate() {
        if s.key.is_empty()
            || !s
                .key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.')
        {
            err(
                &format!("spec.kafka.secretConfig[{i}].key"),
                format!("{:?} is not a librdkafka property name (a-z 0-9 .)", s.key),
            );
        }
        if s.secret_key_ref.name.is_empty() || s.secret_key_ref.key.is_empty() {
            err(
                &format!("spec.kafka.secretConfig[{i}].secretKeyRef"),
                "name and key must not be empty".into(),
            );
        }
    }

    // Budget.
    let b = &spec.budget;
    if !(b.messages_per_second > 0.0 && b.messages_per_second <= MAX_MESSAGES_PER_SECOND) {
        err(
            "spec.budget.messagesPerSecond",
            format!(
                "{} is out of range, must be greater than 0 and at most {MAX_MESSAGES_PER_SECOND}",
                b.messages_per_second
            ),
        );
    }
    if !(1..=MAX_IN_FLIGHT).contains(&b.max_in_flight) {
        err(
            "spec.budget.maxInFlight",
            format!(
                "{} is out of range, must be 1 to {MAX_IN_FLIGHT}",
                b.max_in_flight
            ),
        );
    }
    if !(1..=MAX_BURST).contains(&b.burst) {
        err(
            "spec.budget.burst",
            format!("{} is out of range, must be 1 to {MAX_BURST}", b.burst),
        );
    }
    if !(LEASE_SECONDS.0..=LEASE_SECONDS.1).contains(&b.lease_seconds) {
        err(
            "spec.budget.leaseSeconds",
            format!(
                "{} is out of range, must be {} to {}",
                b.lease_seconds, LEASE_SECONDS.0, LEASE_SECONDS.1
            ),
        );
    }
    if !(REFRESH_MILLIS.0..=REFRESH_MILLIS.1).contains(&b.refresh_millis) {
        err(
            "spec.budget.refreshMillis",
            format!(
                "{} is out of range, must be {} to {}",
                b.refresh_millis, REFRESH_MILLIS.0, REFRESH_MILLIS.1
            ),
        );
    }
    if i64::from(b.lease_seconds) * 1000 <= 2 * i64::from(b.refresh_millis) {
        err(
            "spec.budget.leaseSeconds",
            format!(
                "leaseSeconds * 1000 ({}) must be greater than 2 * refreshMillis ({}) so a lease survives a missed refresh",
                i64::from(b.lease_seconds) * 1000,
                2 * i64::from(b.refresh_millis)
            ),
        );
    }

    // Delivery.
    let d = &spec.delivery;
    let timeout = parse_duration(&d.timeout);
    if timeout.is_none_or(|t| t.is_zero()) {
        err(
            "spec.delivery.timeout",
            format!(
                "{:?} is not a positive duration like 500ms, 5s, 1m or 1h",
                d.timeout
            ),
        );
    }
    let shutdown_grace = parse_duration(&d.shutdown_grace);
    if shutdown_grace.is_none_or(|g| g > Duration::from_secs(3600)) {
        err(
            "spec.delivery.shutdownGrace",
            format!(
                "{:?} is not a duration like 30s or 2m, at most 1h",
                d.shutdown_grace
            ),
        );
    }
    if !(1..=MAX_ATTEMPTS).contains(&d.retry.max_attempts) {
        err(
            "spec.delivery.retry.maxAttempts",
            format!(
                "{} is out of range, must be 1 to {MAX_ATTEMPTS}",
                d.retry.max_attempts
            ),
        );
    }
    if let Some(t) = &d.dead_letter_topic {
        if !is_topic_name(t) {
            err(
                "spec.delivery.deadLetterTopic",
                format!("{t:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"),
            );
        }
    }

    // Sink: exactly one.
    match (&spec.sink.http, &spec.sink.kafka) {
        (Some(_), Some(_)) | (None, None) => err(
            "spec.sink",
            "exactly one of sink.http or sink.kafka must be set".into(),
        ),
        (Some(h), None) => {
            let ok_scheme = h.url.starts_with("http://") || h.url.starts_with("https://");
            if !ok_scheme || h.url.contains(',') || h.url.chars().any(char::is_whitespace) {
                err(
                    "spec.sink.http.url",
                    format!("{:?} is not an http:// or https:// URL", h.url),
                );
            }
        }
        (None, Some(k)) => {
            if !is_topic_name(&k.topic) {
                err(
                    "spec.sink.kafka.topic",
                    format!(
                        "{:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)",
                        k.topic
                    ),
                );
            }
        }
    }

    if let Some(image) = &spec.image {
        if image.trim().is_empty() {
            err("spec.image", "must not be empty when set".into());
        }
    }
    if let Some(pdb) = &spec.pod_disruption_budget {
        if pdb.max_unavailable < 0 {
            err(
                "spec.podDisruptionBudget.maxUnavailable",
                format!(
                    "{} is out of range, must be at least 0",
                    pdb.max_unavailable
                ),
            );
        }
    }

    // Serde already refused unknown enum values; these matches keep the enums and this
    // function in step when a variant is added.
    match spec.budget.policy {
        BudgetPolicy::Equal | BudgetPolicy::Demand => {}
    }
    match spec.delivery.ordering {
        Ordering::None | Ordering::Key | Ordering::Partition => {}
    }

    match (errors.is_empty(), timeout, shutdown_grace) {
        (true, Some(timeout), Some(shutdown_grace)) => Ok(ValidSpec {
            spec: spec.clone(),
            timeout,
            shutdown_grace,
        }),
        _ => Err(InvalidSpec(errors)),
    }
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h` (the CRD's pattern).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = s.split_at(split);
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

fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

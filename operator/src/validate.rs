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
/// Longest sink timeout or retry delay. `pacer run` accepts up to a year; a day is
/// already far beyond any useful value and keeps CEL's `duration()` in range.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

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
    let protocol = pacer_rules::GroupProtocol::from(k.group_protocol);
    for (key, value) in &k.config {
        if key.is_empty() || key.contains(',') || key.contains('=') || value.contains(',') {
            err(
                &format!("spec.kafka.config[{key:?}]"),
                "keys may not be empty or contain ',' or '=' and values may not contain ','".into(),
            );
        } else if let Some(why) = pacer_rules::refused_kafka_property(key, protocol) {
            err(
                &format!("spec.kafka.config[{key:?}]"),
                format!("{why} (with groupProtocol {protocol})"),
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
        } else if let Some(why) = pacer_rules::refused_kafka_property(&s.key, protocol) {
            err(
                &format!("spec.kafka.secretConfig[{i}].key"),
                format!("{why} (with groupProtocol {protocol})"),
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
    if timeout.is_none_or(|t| t.is_zero() || t > MAX_DELAY) {
        err(
            "spec.delivery.timeout",
            format!(
                "{:?} is not a positive duration like 500ms, 5s or 1m, at most 24h",
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
    let initial_delay = parse_duration(&d.retry.initial_delay).filter(|t| *t <= MAX_DELAY);
    let max_delay = parse_duration(&d.retry.max_delay).filter(|t| *t <= MAX_DELAY);
    if initial_delay.is_none() {
        err(
            "spec.delivery.retry.initialDelay",
            format!(
                "{:?} is not a duration like 100ms or 1s, at most 24h",
                d.retry.initial_delay
            ),
        );
    }
    if max_delay.is_none() {
        err(
            "spec.delivery.retry.maxDelay",
            format!(
                "{:?} is not a duration like 10s or 1m, at most 24h",
                d.retry.max_delay
            ),
        );
    }
    if let (Some(i), Some(m)) = (initial_delay, max_delay) {
        if i > m {
            err(
                "spec.delivery.retry.initialDelay",
                format!(
                    "{} must not be longer than maxDelay ({})",
                    d.retry.initial_delay, d.retry.max_delay
                ),
            );
        }
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
            let host = h.url.strip_prefix("http://").unwrap_or_default();
            if host.is_empty()
                || host.starts_with('/')
                || h.url.contains(',')
                || h.url.chars().any(char::is_whitespace)
            {
                err(
                    "spec.sink.http.url",
                    format!(
                        "{:?} is not an http:// URL with a host (the replicas speak plain HTTP to the handler)",
                        h.url
                    ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{MINIMAL, ORDERS_SYNC};
    use serde_json::{json, Value};

    /// The example's spec with the JSON value at `pointer` replaced (or removed when
    /// `value` is null), through YAML -> JSON -> spec as the API server would hand it over.
    fn spec_with(yaml: &str, pointer: &str, value: Value) -> ThrottledConsumerSpec {
        let mut obj: Value = serde_yaml::from_str(yaml).unwrap();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = obj.pointer_mut(&format!("/spec{parent}")).unwrap();
        if value.is_null() {
            target.as_object_mut().unwrap().remove(key);
        } else if let Ok(i) = key.parse::<usize>() {
            target[i] = value;
        } else {
            target[key] = value;
        }
        serde_json::from_value(obj["spec"].clone()).expect("spec deserializes")
    }

    fn message(yaml: &str, pointer: &str, value: Value) -> String {
        validate(&spec_with(yaml, pointer, value))
            .expect_err("spec is invalid")
            .to_string()
    }

    #[test]
    fn every_example_is_valid() {
        for yaml in [ORDERS_SYNC, MINIMAL] {
            let spec: crate::crd::ThrottledConsumer = serde_yaml::from_str(yaml).unwrap();
            validate(&spec.spec).unwrap();
        }
    }

    #[test]
    fn minimal_example_gets_the_documented_defaults() {
        let v = validate(
            &serde_yaml::from_str::<crate::crd::ThrottledConsumer>(MINIMAL)
                .unwrap()
                .spec,
        )
        .unwrap();
        let s = &v.spec;
        assert_eq!(
            (
                s.replicas,
                s.budget.burst,
                s.budget.lease_seconds,
                s.budget.refresh_millis
            ),
            (1, 1, 10, 1000)
        );
        assert_eq!(
            (s.budget.policy, s.delivery.ordering),
            (BudgetPolicy::Demand, Ordering::Key)
        );
        assert_eq!(
            (v.timeout, v.shutdown_grace),
            (Duration::from_secs(5), Duration::from_secs(30))
        );
        assert_eq!(s.delivery.retry.max_attempts, 5);
        assert!(!s.paused);
    }

    /// Every field that can be wrong, with the exact message a user reads in the
    /// `InvalidSpec` condition.
    #[test]
    fn each_invalid_field_is_named_with_its_value_and_the_accepted_range() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/replicas", json!(-1), "spec.replicas: -1 is out of range, must be 0 to 1000"),
            ("/replicas", json!(1001), "spec.replicas: 1001 is out of range, must be 0 to 1000"),
            ("/kafka/bootstrapServers", json!(" "), "spec.kafka.bootstrapServers: must not be empty, e.g. kafka:9092"),
            ("/kafka/topics", json!([]), "spec.kafka.topics: must name at least one topic"),
            ("/kafka/topics/0", json!("orders v2"), r#"spec.kafka.topics[0]: "orders v2" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#),
            ("/kafka/groupId", json!(""), "spec.kafka.groupId: must be 1 to 255 characters"),
            ("/kafka/config", json!({"bootstrap,servers": "x"}), r#"spec.kafka.config["bootstrap,servers"]: keys may not be empty or contain ',' or '=' and values may not contain ','"#),
            ("/kafka/config", json!({"a=b": "x"}), r#"spec.kafka.config["a=b"]: keys may not be empty or contain ',' or '=' and values may not contain ','"#),
            ("/kafka/config", json!({"enable.auto.offset.store": "true"}), r#"spec.kafka.config["enable.auto.offset.store"]: is set by pacer itself: offsets are stored only after delivery (with groupProtocol classic)"#),
            ("/kafka/config", json!({"group.protocol": "consumer"}), r#"spec.kafka.config["group.protocol"]: is chosen with the group protocol setting (classic or consumer) (with groupProtocol classic)"#),
            ("/kafka/config", json!({"sasl.mechanisms": "PLAIN,SCRAM"}), r#"spec.kafka.config["sasl.mechanisms"]: keys may not be empty or contain ',' or '=' and values may not contain ','"#),
            ("/kafka/secretConfig/0", json!({"key": "SASL_PASSWORD", "secretKeyRef": {"name": "k", "key": "p"}}), r#"spec.kafka.secretConfig[0].key: "SASL_PASSWORD" is not a librdkafka property name (a-z 0-9 .)"#),
            ("/kafka/secretConfig/0", json!({"key": "sasl.password", "secretKeyRef": {"name": "", "key": "p"}}), "spec.kafka.secretConfig[0].secretKeyRef: name and key must not be empty"),
            ("/budget/messagesPerSecond", json!(0), "spec.budget.messagesPerSecond: 0 is out of range, must be greater than 0 and at most 1000000"),
            ("/budget/messagesPerSecond", json!(-3.5), "spec.budget.messagesPerSecond: -3.5 is out of range, must be greater than 0 and at most 1000000"),
            ("/budget/messagesPerSecond", json!(2e6), "spec.budget.messagesPerSecond: 2000000 is out of range, must be greater than 0 and at most 1000000"),
            ("/budget/maxInFlight", json!(0), "spec.budget.maxInFlight: 0 is out of range, must be 1 to 100000"),
            ("/budget/maxInFlight", json!(100001), "spec.budget.maxInFlight: 100001 is out of range, must be 1 to 100000"),
            ("/budget/burst", json!(0), "spec.budget.burst: 0 is out of range, must be 1 to 10000"),
            ("/budget/leaseSeconds", json!(3601), "spec.budget.leaseSeconds: 3601 is out of range, must be 1 to 3600"),
            ("/budget/refreshMillis", json!(99), "spec.budget.refreshMillis: 99 is out of range, must be 100 to 600000"),
            ("/budget/leaseSeconds", json!(2), "spec.budget.leaseSeconds: leaseSeconds * 1000 (2000) must be greater than 2 * refreshMillis (2000) so a lease survives a missed refresh"),
            ("/delivery/timeout", json!("5 seconds"), r#"spec.delivery.timeout: "5 seconds" is not a positive duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/timeout", json!("0s"), r#"spec.delivery.timeout: "0s" is not a positive duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/shutdownGrace", json!("2h"), r#"spec.delivery.shutdownGrace: "2h" is not a duration like 30s or 2m, at most 1h"#),
            ("/delivery/retry/maxAttempts", json!(0), "spec.delivery.retry.maxAttempts: 0 is out of range, must be 1 to 1000"),
            ("/delivery/deadLetterTopic", json!("orders/dlq"), r#"spec.delivery.deadLetterTopic: "orders/dlq" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#),
            ("/sink", json!({}), "spec.sink: exactly one of sink.http or sink.kafka must be set"),
            ("/sink", json!({"http": {"url": "http://h/"}, "kafka": {"topic": "t"}}), "spec.sink: exactly one of sink.http or sink.kafka must be set"),
            ("/sink/http/url", json!("ftp://handler/x"), r#"spec.sink.http.url: "ftp://handler/x" is not an http:// URL with a host (the replicas speak plain HTTP to the handler)"#),
            ("/sink/http/url", json!("https://handler/x"), r#"spec.sink.http.url: "https://handler/x" is not an http:// URL with a host (the replicas speak plain HTTP to the handler)"#),
            ("/delivery/retry/initialDelay", json!("soon"), r#"spec.delivery.retry.initialDelay: "soon" is not a duration like 100ms or 1s, at most 24h"#),
            ("/delivery/retry/maxDelay", json!("10"), r#"spec.delivery.retry.maxDelay: "10" is not a duration like 10s or 1m, at most 24h"#),
            ("/delivery/retry/maxDelay", json!("25h"), r#"spec.delivery.retry.maxDelay: "25h" is not a duration like 10s or 1m, at most 24h"#),
            ("/delivery/timeout", json!("1441m"), r#"spec.delivery.timeout: "1441m" is not a positive duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/retry/initialDelay", json!("1m"), "spec.delivery.retry.initialDelay: 1m must not be longer than maxDelay (30s)"),
            ("/sink", json!({"kafka": {"topic": ""}}), r#"spec.sink.kafka.topic: "" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#),
            ("/image", json!(""), "spec.image: must not be empty when set"),
            ("/podDisruptionBudget/maxUnavailable", json!(-1), "spec.podDisruptionBudget.maxUnavailable: -1 is out of range, must be at least 0"),
        ];
        for (pointer, value, expected) in cases {
            assert_eq!(
                message(ORDERS_SYNC, pointer, value.clone()),
                expected,
                "{pointer} = {value}"
            );
        }
    }

    #[test]
    fn a_lease_of_zero_seconds_is_out_of_range_and_too_short_for_the_refresh() {
        assert_eq!(
            message(ORDERS_SYNC, "/budget/leaseSeconds", json!(0)),
            "spec.budget.leaseSeconds: 0 is out of range, must be 1 to 3600; \
             spec.budget.leaseSeconds: leaseSeconds * 1000 (0) must be greater than 2 * refreshMillis (2000) so a lease survives a missed refresh"
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let mut spec = spec_with(ORDERS_SYNC, "/replicas", json!(-2));
        spec.budget.max_in_flight = 0;
        spec.sink.kafka = Some(crate::crd::KafkaSink { topic: "t".into() });
        let err = validate(&spec).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.replicas", "spec.budget.maxInFlight", "spec.sink"]
        );
    }

    #[test]
    fn unknown_enum_values_and_missing_required_fields_are_refused_when_parsing() {
        let mut obj: Value = serde_yaml::from_str(MINIMAL).unwrap();
        obj["spec"]["budget"]["policy"] = json!("fair");
        let err = serde_json::from_value::<ThrottledConsumerSpec>(obj["spec"].clone()).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown variant `fair`, expected `equal` or `demand`"),
            "{err}"
        );

        let mut obj: Value = serde_yaml::from_str(MINIMAL).unwrap();
        obj["spec"]["delivery"] = json!({"ordering": "global"});
        let err = serde_json::from_value::<ThrottledConsumerSpec>(obj["spec"].clone()).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `global`"),
            "{err}"
        );

        let mut obj: Value = serde_yaml::from_str(MINIMAL).unwrap();
        obj["spec"]["kafka"]
            .as_object_mut()
            .unwrap()
            .remove("groupId");
        let err = serde_json::from_value::<ThrottledConsumerSpec>(obj["spec"].clone()).unwrap_err();
        assert_eq!(err.to_string(), "missing field `groupId`");
    }

    #[test]
    fn durations_take_one_number_and_one_unit() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in [
            "",
            "s",
            "5",
            "1.5s",
            "5 s",
            "-1s",
            "1d",
            "1s2ms",
            "1234567890s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn paused_fleet_desires_zero_replicas() {
        let v = validate(&spec_with(ORDERS_SYNC, "/paused", json!(true))).unwrap();
        assert_eq!(v.desired_replicas(), 0);
    }

    #[test]
    fn operator_bounds_match_the_crd_schema() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(crate::crd::ThrottledConsumer::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let max = |p: &str| spec.pointer(p).and_then(Value::as_f64).unwrap();
        assert_eq!(max("/replicas/maximum"), f64::from(MAX_REPLICAS));
        assert_eq!(
            max("/budget/properties/messagesPerSecond/maximum"),
            MAX_MESSAGES_PER_SECOND
        );
        assert_eq!(
            max("/budget/properties/maxInFlight/maximum"),
            f64::from(MAX_IN_FLIGHT)
        );
        assert_eq!(
            max("/budget/properties/burst/maximum"),
            f64::from(MAX_BURST)
        );
        assert_eq!(
            max("/budget/properties/leaseSeconds/minimum"),
            f64::from(LEASE_SECONDS.0)
        );
        assert_eq!(
            max("/budget/properties/leaseSeconds/maximum"),
            f64::from(LEASE_SECONDS.1)
        );
        assert_eq!(
            max("/budget/properties/refreshMillis/minimum"),
            f64::from(REFRESH_MILLIS.0)
        );
        assert_eq!(
            max("/budget/properties/refreshMillis/maximum"),
            f64::from(REFRESH_MILLIS.1)
        );
        assert_eq!(
            max("/delivery/properties/retry/properties/maxAttempts/maximum"),
            f64::from(MAX_ATTEMPTS)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::fixtures::ORDERS_SYNC;
    use proptest::prelude::*;

    fn example() -> ThrottledConsumerSpec {
        serde_yaml::from_str::<crate::crd::ThrottledConsumer>(ORDERS_SYNC)
            .unwrap()
            .spec
    }

    proptest! {
        /// The operator's budget checks agree with the CRD's bounds and CEL rules for
        /// every combination, not just the hand-picked cases.
        #[test]
        fn budget_is_accepted_exactly_when_the_crd_rules_hold(
            rate in -10.0f64..2_000_000.0,
            in_flight in -5i32..200_000,
            lease in -5i32..4_000,
            refresh in 0i32..700_000,
        ) {
            let mut spec = example();
            spec.budget.messages_per_second = rate;
            spec.budget.max_in_flight = in_flight;
            spec.budget.lease_seconds = lease;
            spec.budget.refresh_millis = refresh;
            let crd_rules_hold = rate > 0.0
                && rate <= MAX_MESSAGES_PER_SECOND
                && (1..=MAX_IN_FLIGHT).contains(&in_flight)
                && (LEASE_SECONDS.0..=LEASE_SECONDS.1).contains(&lease)
                && (REFRESH_MILLIS.0..=REFRESH_MILLIS.1).contains(&refresh)
                && i64::from(lease) * 1000 > 2 * i64::from(refresh);
            prop_assert_eq!(validate(&spec).is_ok(), crd_rules_hold);
        }

        /// Whatever the replica count, the Deployment and the coordinator are told the
        /// same number.
        #[test]
        fn deployment_and_coordinator_agree_on_replicas(replicas in 0i32..=MAX_REPLICAS, paused: bool) {
            let mut tc: crate::crd::ThrottledConsumer = serde_yaml::from_str(ORDERS_SYNC).unwrap();
            tc.metadata.uid = Some(crate::fixtures::UID.into());
            tc.spec.replicas = replicas;
            tc.spec.paused = paused;
            let v = validate(&tc.spec).unwrap();
            let d = crate::build::deployment(&tc, &v, &crate::fixtures::settings());
            let expected = crate::reconcile::budget_config(&v).expected_members;
            prop_assert_eq!(d.spec.unwrap().replicas, Some(expected as i32));
            prop_assert_eq!(expected as i32, if paused { 0 } else { replicas });
        }
    }
}

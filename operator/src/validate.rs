//! Validation of a `ThrottledConsumer` spec: pure, no I/O.
//!
//! The CRD schema and its CEL rules refuse most bad specs at `kubectl apply`, but an
//! object can predate a CRD upgrade or come through a server without CEL, so the
//! operator checks everything again here, in the same words. Every problem is reported
//! at once, each naming the field, the value and what is accepted; the reconciler puts
//! the message in the `InvalidSpec` condition and leaves the running Deployment alone.
//!
//! The rules a spec shares with `pacer run` and the budgets file (bounds, the duration
//! syntax, names) are `pacer_rules`'; only the rules of the resource itself are here.

use std::fmt;
use std::time::Duration;

use pacer_rules::duration::{self, RETRY_DELAY, SHUTDOWN_GRACE, TIMEOUT};
use pacer_rules::kafka::{self, topic_name};
use pacer_rules::limits::{self, burst, lease_seconds, max_attempts, max_in_flight, rate};
use pacer_rules::names::NAME_MAX_LEN;
use pacer_rules::{names, GroupProtocol};

use crate::crd::{
    self, BudgetPolicy, BudgetSpec, DeliverySpec, KafkaSpec, Ordering, SinkSpec,
    ThrottledConsumerSpec,
};

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

/// Most replicas a ThrottledConsumer may ask for (the operator's own bound; the CRD schema
/// has the same number and a test keeps them in step).
pub const MAX_REPLICAS: i32 = 1000;

/// Every problem found so far, each naming its field.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Records a rule's complaint about `field`, or passes the checked value on.
    fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.add(field, message)).ok()
    }
}

/// Checks a spec. Pure; mirrors the CRD's bounds, patterns and CEL rules.
pub fn validate(spec: &ThrottledConsumerSpec) -> Result<ValidSpec, InvalidSpec> {
    let mut errors = Errors::default();
    if !(0..=MAX_REPLICAS).contains(&spec.replicas) {
        let message = format!(
            "{} is out of range, must be 0 to {MAX_REPLICAS}",
            spec.replicas
        );
        errors.add("spec.replicas", message);
    }
    check_kafka(&spec.kafka, &mut errors);
    check_budget(&spec.budget, &mut errors);
    let durations = check_delivery(&spec.delivery, &mut errors);
    check_sink(&spec.sink, &mut errors);
    if let Some(image) = &spec.image {
        if image.trim().is_empty() {
            errors.add("spec.image", "must not be empty when set");
        }
        errors.check("spec.image", at_most(image, crd::IMAGE_MAX_LEN));
    }
    if let Some(pdb) = &spec.pod_disruption_budget {
        if !(0..=MAX_REPLICAS).contains(&pdb.max_unavailable) {
            let message = format!(
                "{} is out of range, must be 0 to {MAX_REPLICAS}",
                pdb.max_unavailable
            );
            errors.add("spec.podDisruptionBudget.maxUnavailable", message);
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

    match (errors.0.is_empty(), durations) {
        (true, Some((timeout, shutdown_grace))) => Ok(ValidSpec {
            spec: spec.clone(),
            timeout,
            shutdown_grace,
        }),
        _ => Err(InvalidSpec(errors.0)),
    }
}

fn check_kafka(k: &KafkaSpec, errors: &mut Errors) {
    errors.check(
        "spec.kafka.bootstrapServers",
        kafka::bootstrap_servers(&k.bootstrap_servers),
    );
    errors.check(
        "spec.kafka.bootstrapServers",
        at_most(&k.bootstrap_servers, crd::BOOTSTRAP_SERVERS_MAX_LEN),
    );
    if k.topics.is_empty() {
        errors.add("spec.kafka.topics", "must name at least one topic");
    }
    if k.topics.len() > crd::TOPICS_MAX {
        let message = format!(
            "{} topics, at most {} allowed",
            k.topics.len(),
            crd::TOPICS_MAX
        );
        errors.add("spec.kafka.topics", message);
    }
    if k.secret_config.len() > crd::SECRET_CONFIG_MAX {
        let message = format!(
            "{} entries, at most {} allowed",
            k.secret_config.len(),
            crd::SECRET_CONFIG_MAX
        );
        errors.add("spec.kafka.secretConfig", message);
    }
    for (i, t) in k.topics.iter().enumerate() {
        errors.check(&format!("spec.kafka.topics[{i}]"), topic_name(t));
    }
    errors.check("spec.kafka.groupId", kafka::group_id(&k.group_id));
    let protocol = GroupProtocol::from(k.group_protocol);
    for (key, value) in &k.config {
        let field = format!("spec.kafka.config[{key:?}]");
        if errors
            .check(&field, passthrough_property(key, protocol))
            .is_some()
            && value.contains(',')
        {
            // Not a rule of librdkafka's: the replicas receive every property in one
            // comma-separated variable, where a comma would start a new property.
            errors.add(&field, "values may not contain ','");
        }
    }
    for (i, s) in k.secret_config.iter().enumerate() {
        let field = format!("spec.kafka.secretConfig[{i}]");
        errors.check(
            &format!("{field}.key"),
            passthrough_property(&s.key, protocol),
        );
        errors.check(&format!("{field}.key"), at_most(&s.key, NAME_MAX_LEN));
        let r = &s.secret_key_ref;
        errors.check(
            &format!("{field}.secretKeyRef.name"),
            at_most(&r.name, NAME_MAX_LEN),
        );
        errors.check(
            &format!("{field}.secretKeyRef.key"),
            at_most(&r.key, NAME_MAX_LEN),
        );
        if s.secret_key_ref.name.is_empty() || s.secret_key_ref.key.is_empty() {
            errors.add(
                &format!("spec.kafka.secretConfig[{i}].secretKeyRef"),
                "name and key must not be empty",
            );
        }
    }
}

/// `Err` when `s` has more than `max` characters (the API server counts characters for
/// a schema's `maxLength`).
fn at_most(s: &str, max: usize) -> Result<(), String> {
    let n = s.chars().count();
    if n > max {
        Err(format!("{n} characters, at most {max} allowed"))
    } else {
        Ok(())
    }
}

/// A property a user may pass to librdkafka: a name `pacer run` recognises as one, and
/// not one pacer sets itself.
fn passthrough_property(key: &str, protocol: GroupProtocol) -> Result<(), String> {
    kafka::property_name(key)?;
    match pacer_rules::refused_kafka_property(key, protocol) {
        Some(why) => Err(format!("{why} (with groupProtocol {protocol})")),
        None => Ok(()),
    }
}

fn check_budget(b: &BudgetSpec, errors: &mut Errors) {
    errors.check(
        "spec.budget.messagesPerSecond",
        rate::check(b.messages_per_second),
    );
    errors.check(
        "spec.budget.maxInFlight",
        max_in_flight::RANGE.check(b.max_in_flight.into()),
    );
    errors.check("spec.budget.burst", burst::RANGE.check(b.burst.into()));
    errors.check(
        "spec.budget.leaseSeconds",
        lease_seconds::RANGE.check(b.lease_seconds.into()),
    );
    errors.check(
        "spec.budget.refreshMillis",
        limits::refresh_millis::RANGE.check(b.refresh_millis.into()),
    );
    errors.check(
        "spec.budget.leaseSeconds",
        limits::lease_outlives_refreshes(b.lease_seconds.into(), b.refresh_millis.into()),
    );
    if let Some(f) = b.fallback_seconds {
        errors.check(
            "spec.budget.fallbackSeconds",
            limits::fallback_seconds::RANGE.check(f.into()),
        );
    }
}

/// Checks the delivery settings; the sink timeout and the shutdown grace when both parse.
fn check_delivery(d: &DeliverySpec, errors: &mut Errors) -> Option<(Duration, Duration)> {
    let timeout = errors.check("spec.delivery.timeout", TIMEOUT.check(&d.timeout));
    let shutdown_grace = errors.check(
        "spec.delivery.shutdownGrace",
        SHUTDOWN_GRACE.check(&d.shutdown_grace),
    );
    let retry = &d.retry;
    errors.check(
        "spec.delivery.retry.maxAttempts",
        max_attempts::RANGE.check(retry.max_attempts.into()),
    );
    let initial_delay = errors.check(
        "spec.delivery.retry.initialDelay",
        RETRY_DELAY.check(&retry.initial_delay),
    );
    let max_delay = errors.check(
        "spec.delivery.retry.maxDelay",
        RETRY_DELAY.check(&retry.max_delay),
    );
    if let (Some(initial), Some(max)) = (initial_delay, max_delay) {
        errors.check(
            "spec.delivery.retry.initialDelay",
            duration::retry_delays(initial, max, "maxDelay"),
        );
    }
    if let Some(t) = &d.dead_letter_topic {
        errors.check("spec.delivery.deadLetterTopic", topic_name(t));
    }
    Some((timeout?, shutdown_grace?))
}

fn check_sink(sink: &SinkSpec, errors: &mut Errors) {
    match (&sink.http, &sink.kafka) {
        (Some(_), Some(_)) | (None, None) => errors.add(
            "spec.sink",
            "exactly one of sink.http or sink.kafka must be set",
        ),
        (Some(h), None) => {
            let url = names::http_url(&h.url)
                .map_err(|e| format!("{e} (the replicas speak plain HTTP to the handler)"));
            errors.check("spec.sink.http.url", url);
        }
        (None, Some(k)) => {
            errors.check("spec.sink.kafka.topic", topic_name(&k.topic));
        }
    }
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
            ("/kafka/groupId", json!(""), "spec.kafka.groupId: must be 1 to 255 characters, not all blank"),
            ("/kafka/config", json!({"bootstrap,servers": "x"}), r#"spec.kafka.config["bootstrap,servers"]: "bootstrap,servers" is not a librdkafka property name (a-z A-Z 0-9 . _ -)"#),
            ("/kafka/config", json!({"a=b": "x"}), r#"spec.kafka.config["a=b"]: "a=b" is not a librdkafka property name (a-z A-Z 0-9 . _ -)"#),
            ("/kafka/config", json!({"enable.auto.offset.store": "true"}), r#"spec.kafka.config["enable.auto.offset.store"]: is set by pacer itself: offsets are stored only after delivery (with groupProtocol classic)"#),
            ("/kafka/config", json!({"group.protocol": "consumer"}), r#"spec.kafka.config["group.protocol"]: is chosen with the group protocol setting (classic or consumer) (with groupProtocol classic)"#),
            ("/kafka/config", json!({"sasl.mechanisms": "PLAIN,SCRAM"}), r#"spec.kafka.config["sasl.mechanisms"]: values may not contain ','"#),
            ("/kafka/secretConfig/0", json!({"key": "sasl password", "secretKeyRef": {"name": "k", "key": "p"}}), r#"spec.kafka.secretConfig[0].key: "sasl password" is not a librdkafka property name (a-z A-Z 0-9 . _ -)"#),
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
            ("/delivery/shutdownGrace", json!("2h"), r#"spec.delivery.shutdownGrace: "2h" is not a duration like 500ms, 5s or 1m, at most 1h"#),
            ("/delivery/retry/maxAttempts", json!(0), "spec.delivery.retry.maxAttempts: 0 is out of range, must be 1 to 1000"),
            ("/delivery/deadLetterTopic", json!("orders/dlq"), r#"spec.delivery.deadLetterTopic: "orders/dlq" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#),
            ("/sink", json!({}), "spec.sink: exactly one of sink.http or sink.kafka must be set"),
            ("/sink", json!({"http": {"url": "http://h/"}, "kafka": {"topic": "t"}}), "spec.sink: exactly one of sink.http or sink.kafka must be set"),
            ("/sink/http/url", json!("ftp://handler/x"), r#"spec.sink.http.url: "ftp://handler/x" is not an http://HOST[:PORT][/PATH] URL (the replicas speak plain HTTP to the handler)"#),
            ("/sink/http/url", json!("https://handler/x"), r#"spec.sink.http.url: "https://handler/x" is not an http://HOST[:PORT][/PATH] URL (the replicas speak plain HTTP to the handler)"#),
            ("/sink/http/url", json!("http://handler:65536/x"), r#"spec.sink.http.url: "http://handler:65536/x" is not an http://HOST[:PORT][/PATH] URL (the replicas speak plain HTTP to the handler)"#),
            ("/delivery/retry/initialDelay", json!("soon"), r#"spec.delivery.retry.initialDelay: "soon" is not a duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/retry/maxDelay", json!("10"), r#"spec.delivery.retry.maxDelay: "10" is not a duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/retry/maxDelay", json!("25h"), r#"spec.delivery.retry.maxDelay: "25h" is not a duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/timeout", json!("1441m"), r#"spec.delivery.timeout: "1441m" is not a positive duration like 500ms, 5s or 1m, at most 24h"#),
            ("/delivery/retry/initialDelay", json!("1m"), "spec.delivery.retry.initialDelay: 1m must not be longer than maxDelay (30s)"),
            ("/sink", json!({"kafka": {"topic": ""}}), r#"spec.sink.kafka.topic: "" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#),
            ("/image", json!(""), "spec.image: must not be empty when set"),
            ("/podDisruptionBudget/maxUnavailable", json!(-1), "spec.podDisruptionBudget.maxUnavailable: -1 is out of range, must be 0 to 1000"),
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
    fn paused_fleet_desires_zero_replicas() {
        let v = validate(&spec_with(ORDERS_SYNC, "/paused", json!(true))).unwrap();
        assert_eq!(v.desired_replicas(), 0);
    }

    /// The CRD schema takes its bounds and patterns from `pacer_rules` (crd.rs names the
    /// constants); this catches an attribute that goes back to a literal.
    #[test]
    fn operator_bounds_match_the_crd_schema() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(crate::crd::ThrottledConsumer::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let num = |p: &str| spec.pointer(p).and_then(Value::as_f64).unwrap();
        let text = |p: &str| spec.pointer(p).and_then(Value::as_str).unwrap().to_string();
        let range = |p: &str| (num(&format!("{p}/minimum")), num(&format!("{p}/maximum")));
        let bounds = |r: limits::IntRange| (r.min as f64, r.max as f64);
        assert_eq!(range("/replicas"), (0.0, f64::from(MAX_REPLICAS)));
        assert_eq!(
            range("/budget/properties/messagesPerSecond"),
            (rate::ABOVE, rate::MAX)
        );
        let ints = [
            ("/budget/properties/maxInFlight", max_in_flight::RANGE),
            ("/budget/properties/burst", burst::RANGE),
            ("/budget/properties/leaseSeconds", lease_seconds::RANGE),
            (
                "/budget/properties/fallbackSeconds",
                limits::fallback_seconds::RANGE,
            ),
            (
                "/budget/properties/refreshMillis",
                limits::refresh_millis::RANGE,
            ),
            (
                "/delivery/properties/retry/properties/maxAttempts",
                max_attempts::RANGE,
            ),
        ];
        for (pointer, r) in ints {
            assert_eq!(range(pointer), bounds(r), "{pointer}");
        }
        for pointer in [
            "/delivery/properties/timeout/pattern",
            "/delivery/properties/shutdownGrace/pattern",
            "/delivery/properties/retry/properties/initialDelay/pattern",
            "/delivery/properties/retry/properties/maxDelay/pattern",
        ] {
            assert_eq!(text(pointer), duration::PATTERN, "{pointer}");
            let max_len = pointer.replace("/pattern", "/maxLength");
            assert_eq!(num(&max_len), duration::MAX_LEN as f64, "{max_len}");
        }
        // The retry rule reads the durations only once they match the pattern.
        let rule = text("/delivery/properties/retry/x-kubernetes-validations/0/rule");
        assert_eq!(
            rule.matches(&format!(".matches('{}')", duration::PATTERN))
                .count(),
            2,
            "{rule}"
        );
        assert_eq!(
            text("/sink/properties/http/properties/url/pattern"),
            names::HTTP_URL_PATTERN
        );
        assert_eq!(
            text("/kafka/properties/secretConfig/items/properties/key/pattern"),
            kafka::PROPERTY_NAME_PATTERN
        );
        let topic_max = kafka::TOPIC_MAX_LEN as f64;
        assert_eq!(num("/kafka/properties/topics/items/maxLength"), topic_max);
        assert_eq!(
            num("/delivery/properties/deadLetterTopic/maxLength"),
            topic_max
        );
        assert_eq!(
            num("/sink/properties/kafka/properties/topic/maxLength"),
            topic_max
        );
        assert_eq!(
            num("/kafka/properties/groupId/maxLength"),
            kafka::GROUP_ID_MAX_LEN as f64
        );
    }

    /// The CRD's enums are spelled as `pacer_rules` spells them (its schema and serde
    /// names come from the Rust enums, so they are checked rather than shared).
    #[test]
    fn crd_enums_are_spelled_as_the_shared_rules_spell_them() {
        use crate::crd::GroupProtocol as CrdProtocol;
        fn names<T: serde::Serialize>(all: &[T]) -> Vec<String> {
            all.iter()
                .map(|v| {
                    serde_json::to_value(v)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        }
        assert_eq!(
            names(&[Ordering::None, Ordering::Key, Ordering::Partition]),
            pacer_rules::Ordering::NAMES
        );
        assert_eq!(
            names(&[BudgetPolicy::Equal, BudgetPolicy::Demand]),
            pacer_rules::Policy::NAMES
        );
        assert_eq!(
            names(&[CrdProtocol::Classic, CrdProtocol::Consumer]),
            GroupProtocol::NAMES
        );
        for o in [Ordering::None, Ordering::Key, Ordering::Partition] {
            let name = serde_json::to_value(o).unwrap();
            assert_eq!(pacer_rules::Ordering::from(o).as_str(), name);
        }
        for p in [BudgetPolicy::Equal, BudgetPolicy::Demand] {
            let name = serde_json::to_value(p).unwrap();
            assert_eq!(pacer_rules::Policy::from(p).as_str(), name);
        }
        assert_eq!(
            (Ordering::default(), BudgetPolicy::default()),
            (Ordering::Key, BudgetPolicy::Demand)
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
            let crd_rules_hold = rate > rate::ABOVE
                && rate <= rate::MAX
                && max_in_flight::RANGE.contains(in_flight.into())
                && lease_seconds::RANGE.contains(lease.into())
                && limits::refresh_millis::RANGE.contains(refresh.into())
                && i64::from(lease) * 1000 > limits::REFRESHES_PER_LEASE * i64::from(refresh);
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

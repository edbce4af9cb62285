//! Kafka-side rules: topic names, the group id, bootstrap servers, and the librdkafka
//! properties a user may pass through (`--kafka-config`, `spec.kafka.config`,
//! `spec.kafka.secretConfig`).

use crate::GroupProtocol;

/// Longest topic name Kafka accepts.
pub const TOPIC_MAX_LEN: usize = 249;

/// A Kafka topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`, and not `.` or `..` (Kafka's own
/// rule). Used for the topics consumed, the dead-letter topic and a Kafka sink. `pacer
/// run` used to accept any non-empty text and leave the refusal to the broker, minutes
/// into a run; Kafka's rule won.
pub fn topic_name(topic: &str) -> Result<(), String> {
    let ok = !topic.is_empty()
        && topic.len() <= TOPIC_MAX_LEN
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{topic:?} is not a Kafka topic name (1 to {TOPIC_MAX_LEN} of a-z A-Z 0-9 . _ -)"
        ))
    }
}

/// Longest consumer group id, in characters.
pub const GROUP_ID_MAX_LEN: usize = 255;

/// A consumer group id: 1 to 255 characters, not all blank. The operator used to count
/// bytes where the CRD counts characters; characters won (a non-ASCII id the API server
/// stored must not become invalid in the operator). `pacer run` used to have no upper
/// bound.
pub fn group_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() || id.chars().count() > GROUP_ID_MAX_LEN {
        Err(format!(
            "must be 1 to {GROUP_ID_MAX_LEN} characters, not all blank"
        ))
    } else {
        Ok(())
    }
}

/// Bootstrap servers: not blank (librdkafka parses the `host:port` list itself).
pub fn bootstrap_servers(servers: &str) -> Result<(), String> {
    if servers.trim().is_empty() {
        Err("must not be empty, e.g. kafka:9092".into())
    } else {
        Ok(())
    }
}

/// The syntax of a passthrough librdkafka property name, for the CRD schema.
pub const PROPERTY_NAME_PATTERN: &str = r"^[A-Za-z0-9._-]+$";

/// A librdkafka property name: one or more of `a-z A-Z 0-9 . _ -`. `pacer run` splits
/// `--kafka-config` at commas and takes a piece as a new property only when it starts
/// with such a name, so a name the operator accepted but the runtime did not (a space,
/// say) would have been glued to the previous value. The runtime's syntax won; the CRD's
/// `secretConfig` keys (`a-z 0-9 .` only) were widened to it.
pub fn property_name(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a librdkafka property name (a-z A-Z 0-9 . _ -)"
        ))
    }
}

/// librdkafka properties a user may not set through passthrough config (`--kafka-config`,
/// `spec.kafka.config`, `spec.kafka.secretConfig`), and why. `None`: the key is the
/// user's to set.
pub fn refused_kafka_property(key: &str, protocol: GroupProtocol) -> Option<&'static str> {
    match key {
        "group.id" | "bootstrap.servers" => {
            Some("is set by pacer itself from the group id and bootstrap servers")
        }
        "enable.auto.offset.store" => {
            Some("is set by pacer itself: offsets are stored only after delivery")
        }
        "group.protocol" => Some("is chosen with the group protocol setting (classic or consumer)"),
        "session.timeout.ms" | "heartbeat.interval.ms" | "partition.assignment.strategy"
        | "group.protocol.type"
            if protocol == GroupProtocol::Consumer =>
        {
            Some("is not supported with the consumer group protocol: the broker sets it (group.consumer.* broker settings)")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafkas_rule() {
        let longest = "t".repeat(TOPIC_MAX_LEN);
        for ok in ["a", "orders", "Orders_v1.2-x", "...", longest.as_str()] {
            assert_eq!(topic_name(ok), Ok(()), "{ok:?}");
        }
        let too_long = "t".repeat(TOPIC_MAX_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "orders v2",
            "orders/dlq",
            "a,b",
            "ü",
            too_long.as_str(),
        ] {
            assert!(topic_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            topic_name("orders/dlq").unwrap_err(),
            r#""orders/dlq" is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"#
        );
    }

    #[test]
    fn group_ids_count_characters_not_bytes() {
        assert!(group_id("g").is_ok());
        assert!(group_id(&"é".repeat(GROUP_ID_MAX_LEN)).is_ok());
        assert!(group_id(&"g".repeat(GROUP_ID_MAX_LEN + 1)).is_err());
        assert_eq!(
            group_id(" ").unwrap_err(),
            "must be 1 to 255 characters, not all blank"
        );
        assert!(group_id("").is_err());
    }

    #[test]
    fn bootstrap_servers_may_not_be_blank() {
        assert!(bootstrap_servers("kafka:9092").is_ok());
        assert!(bootstrap_servers(" ").is_err());
    }

    #[test]
    fn property_names_are_what_the_runtimes_config_splitter_recognises() {
        for ok in ["sasl.password", "ssl_key", "a-b", "X"] {
            assert_eq!(property_name(ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "a b", "a,b", "a=b", "é"] {
            assert!(property_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_offset_store_switch_is_refused_under_both_protocols() {
        for p in [GroupProtocol::Classic, GroupProtocol::Consumer] {
            assert!(refused_kafka_property("enable.auto.offset.store", p).is_some());
            assert!(refused_kafka_property("group.protocol", p).is_some());
            assert!(refused_kafka_property("security.protocol", p).is_none());
        }
    }

    #[test]
    fn classic_group_timings_are_the_users_only_under_the_classic_protocol() {
        for key in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
        ] {
            assert!(refused_kafka_property(key, GroupProtocol::Classic).is_none());
            assert!(refused_kafka_property(key, GroupProtocol::Consumer).is_some());
        }
    }
}

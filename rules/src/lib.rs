//! Rules that more than one crate enforces, defined once. The operator validates a
//! ThrottledConsumer with them, `pacer run` validates its flags with them: a spec the
//! operator accepts must start a replica, and a flag the replica refuses must be refused
//! on the CR first.
//!
//! Pure: no I/O, no dependencies.

use std::fmt;
use std::str::FromStr;

/// The Kafka consumer-group protocol a replica speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), with the `cooperative-sticky`
    /// assignor: every Kafka version, incremental rebalances.
    #[default]
    Classic,
    /// KIP-848 (`group.protocol=consumer`, Kafka 4.0 and later): the broker assigns
    /// partitions and sets the heartbeat and session times
    /// (`group.consumer.heartbeat.interval.ms`, `group.consumer.session.timeout.ms`).
    Consumer,
}

impl GroupProtocol {
    /// Every value, in the spelling flags, env and the CRD use.
    pub const NAMES: [&'static str; 2] = ["classic", "consumer"];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

impl fmt::Display for GroupProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(GroupProtocol::Classic),
            "consumer" => Ok(GroupProtocol::Consumer),
            _ => Err(format!(
                "{s:?}: expected one of {}",
                GroupProtocol::NAMES.join(", ")
            )),
        }
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
    fn group_protocols_round_trip_through_their_names() {
        for name in GroupProtocol::NAMES {
            assert_eq!(name.parse::<GroupProtocol>().unwrap().as_str(), name);
        }
        let e = "eager".parse::<GroupProtocol>().unwrap_err();
        assert!(
            e.contains("eager") && e.contains("classic, consumer"),
            "{e}"
        );
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

//! Settings with a fixed list of values, in the one spelling that flags, env vars, the
//! CRD and the budgets file use. The CRD keeps enums of its own (its schema is derived
//! from them) and converts into these; a test there checks the spellings agree.

use std::fmt;
use std::str::FromStr;

/// Defines an enum with its names, `as_str`, `Display` and `FromStr` (whose error lists
/// the accepted names).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the spelling flags, env, the CRD and the budgets file use.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("{s:?}: expected one of {}", $name::NAMES.join(", "))),
                }
            }
        }
    };
}

named_enum! {
    /// The Kafka consumer-group protocol a replica speaks.
    pub enum GroupProtocol {
        /// The classic protocol (JoinGroup/SyncGroup), with the `cooperative-sticky`
        /// assignor: every Kafka version, incremental rebalances.
        #[default]
        Classic => "classic",
        /// KIP-848 (`group.protocol=consumer`, Kafka 4.0 and later): the broker assigns
        /// partitions and sets the heartbeat and session times
        /// (`group.consumer.heartbeat.interval.ms`, `group.consumer.session.timeout.ms`).
        Consumer => "consumer",
    }
}

named_enum! {
    /// Message ordering the dispatcher enforces. The CRD defaults to `key` and `pacer run`
    /// to `none`; the operator always passes it, so only the spellings are shared.
    pub enum Ordering {
        /// Any number of messages of a partition in flight at once.
        #[default]
        None => "none",
        /// At most one message per key in flight; a key's messages go in offset order.
        Key => "key",
        /// At most one message per partition in flight.
        Partition => "partition",
    }
}

named_enum! {
    /// How a budget's capacity is split among its members.
    pub enum Policy {
        /// `capacity / max(live members, expected members)`: a scale-up shrinks the
        /// running members before the new pods even start.
        Equal => "equal",
        /// Max-min fair on reported demand (water-filling), the rest spread evenly: an
        /// idle member's share flows to busy ones.
        #[default]
        Demand => "demand",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: FromStr<Err = String> + fmt::Display>(names: &[&str]) {
        for name in names {
            assert_eq!(name.parse::<T>().unwrap().to_string(), *name);
        }
    }

    #[test]
    fn every_name_round_trips() {
        round_trip::<GroupProtocol>(GroupProtocol::NAMES);
        round_trip::<Ordering>(Ordering::NAMES);
        round_trip::<Policy>(Policy::NAMES);
    }

    #[test]
    fn an_unknown_name_is_refused_listing_the_accepted_ones() {
        let e = "eager".parse::<GroupProtocol>().unwrap_err();
        assert_eq!(e, r#""eager": expected one of classic, consumer"#);
        let e = "global".parse::<Ordering>().unwrap_err();
        assert_eq!(e, r#""global": expected one of none, key, partition"#);
        // Spellings are exact: no case folding.
        assert!("Equal".parse::<Policy>().is_err());
    }
}

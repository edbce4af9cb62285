//! The budgets file of the standalone coordinator (`pacer coordinator --budgets FILE`).
//!
//! ```yaml
//! budgets:
//!   - namespace: default
//!     name: orders
//!     messagesPerSecond: 100     # > 0
//!     maxInFlight: 10            # >= 1
//!     policy: demand             # equal | demand (default demand)
//!     leaseSeconds: 10           # 1..=3600, lease * 1000 > 2 * refreshMillis
//!     refreshMillis: 1000        # >= 50
//!     expectedMembers: 3         # >= 1 (default 1)
//!     fallbackSeconds: 30        # optional, default 3 * leaseSeconds
//!     token: change-me-please    # >= 16 characters
//! ```
//!
//! Parsing is pure; errors name the entry and the field, the value and what is accepted.

use crate::ledger::BudgetConfig;
use crate::policy::Policy;
use crate::protocol::Share;
use crate::service::BudgetId;
use serde::Deserialize;
use std::collections::BTreeSet;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    budgets: Vec<FileBudget>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileBudget {
    namespace: String,
    name: String,
    messages_per_second: f64,
    max_in_flight: i64,
    #[serde(default)]
    policy: Policy,
    #[serde(default = "default_lease_seconds")]
    lease_seconds: i64,
    #[serde(default = "default_refresh_millis")]
    refresh_millis: i64,
    #[serde(default = "default_expected")]
    expected_members: i64,
    #[serde(default)]
    fallback_seconds: Option<i64>,
    token: String,
}

fn default_lease_seconds() -> i64 {
    10
}
fn default_refresh_millis() -> i64 {
    1000
}
fn default_expected() -> i64 {
    1
}

/// One validated budget from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub id: BudgetId,
    pub config: BudgetConfig,
    pub token: String,
}

/// Shortest accepted token: 16 characters (the operator generates 256-bit tokens).
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FileError {
    #[error("budgets file is not valid YAML for this format: {0}")]
    Parse(String),
    #[error("budgets[{index}].{field}: {problem}")]
    Field {
        index: usize,
        field: &'static str,
        problem: String,
    },
}

fn field(index: usize, field: &'static str, problem: impl Into<String>) -> FileError {
    FileError::Field {
        index,
        field,
        problem: problem.into(),
    }
}

fn check_name(index: usize, name: &'static str, v: &str) -> Result<(), FileError> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(field(
            index,
            name,
            format!("must be 1 to 253 characters of a-z, 0-9, '-' or '.', got {v:?}"),
        ))
    }
}

/// Parses and validates a budgets file.
pub fn parse(text: &str) -> Result<Vec<FileEntry>, FileError> {
    let doc: FileDoc = serde_yaml::from_str(text).map_err(|e| FileError::Parse(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(doc.budgets.len());
    for (i, b) in doc.budgets.into_iter().enumerate() {
        check_name(i, "namespace", &b.namespace)?;
        check_name(i, "name", &b.name)?;
        if !(b.messages_per_second.is_finite() && b.messages_per_second > 0.0) {
            return Err(field(
                i,
                "messagesPerSecond",
                format!("must be a finite number > 0, got {}", b.messages_per_second),
            ));
        }
        if !(1..=i64::from(u32::MAX)).contains(&b.max_in_flight) {
            return Err(field(
                i,
                "maxInFlight",
                format!("must be a whole number >= 1, got {}", b.max_in_flight),
            ));
        }
        if !(1..=3600).contains(&b.lease_seconds) {
            return Err(field(
                i,
                "leaseSeconds",
                format!("must be 1 to 3600, got {}", b.lease_seconds),
            ));
        }
        if !(50..=600_000).contains(&b.refresh_millis) {
            return Err(field(
                i,
                "refreshMillis",
                format!("must be 50 to 600000, got {}", b.refresh_millis),
            ));
        }
        if b.lease_seconds * 1000 <= 2 * b.refresh_millis {
            return Err(field(
                i,
                "leaseSeconds",
                format!(
                    "leaseSeconds * 1000 must be more than 2 * refreshMillis (a lease must survive a lost refresh), got {} and {}",
                    b.lease_seconds, b.refresh_millis
                ),
            ));
        }
        if !(1..=100_000).contains(&b.expected_members) {
            return Err(field(
                i,
                "expectedMembers",
                format!("must be 1 to 100000, got {}", b.expected_members),
            ));
        }
        let fallback_seconds = b.fallback_seconds.unwrap_or(3 * b.lease_seconds);
        if !(0..=86_400).contains(&fallback_seconds) {
            return Err(field(
                i,
                "fallbackSeconds",
                format!("must be 0 to 86400, got {fallback_seconds}"),
            ));
        }
        if b.token.chars().count() < MIN_TOKEN_LEN {
            return Err(field(
                i,
                "token",
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        let id = BudgetId::new(b.namespace, b.name);
        if !seen.insert(id.clone()) {
            return Err(field(i, "name", format!("budget {id} is listed twice")));
        }
        out.push(FileEntry {
            id,
            config: BudgetConfig {
                capacity: Share::new(b.messages_per_second, b.max_in_flight as u32),
                policy: b.policy,
                expected_members: b.expected_members as u32,
                lease_ms: b.lease_seconds as u64 * 1000,
                refresh_ms: b.refresh_millis as u64,
                fallback_ms: fallback_seconds as u64 * 1000,
            },
            token: b.token,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "budgets:\n  - namespace: default\n    name: orders\n    messagesPerSecond: 100\n    maxInFlight: 10\n    policy: equal\n    expectedMembers: 3\n    token: 0123456789abcdef\n";

    #[test]
    fn a_good_file_parses_with_defaults() {
        let b = parse(GOOD).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].id.to_string(), "default/orders");
        assert_eq!(b[0].config.capacity, Share::new(100.0, 10));
        assert_eq!(b[0].config.policy, Policy::Equal);
        assert_eq!(b[0].config.lease_ms, 10_000);
        assert_eq!(b[0].config.refresh_ms, 1_000);
        assert_eq!(b[0].config.fallback_ms, 30_000);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn each_bad_field_is_named_with_what_is_accepted() {
        let cases = [
            ("messagesPerSecond: 100", "messagesPerSecond: -1", "budgets[0].messagesPerSecond: must be a finite number > 0, got -1"),
            ("messagesPerSecond: 100", "messagesPerSecond: .nan", "budgets[0].messagesPerSecond: must be a finite number > 0, got NaN"),
            ("maxInFlight: 10", "maxInFlight: 0", "budgets[0].maxInFlight: must be a whole number >= 1, got 0"),
            ("expectedMembers: 3", "expectedMembers: 0", "budgets[0].expectedMembers: must be 1 to 100000, got 0"),
            ("token: 0123456789abcdef", "token: short", "budgets[0].token: must be at least 16 characters"),
            ("name: orders", "name: Orders", "budgets[0].name: must be 1 to 253 characters of a-z, 0-9, '-' or '.', got \"Orders\""),
            ("policy: equal", "policy: random", "unknown variant `random`, expected `equal` or `demand`"),
            ("policy: equal", "policy: equal\n    leaseSeconds: 1\n    refreshMillis: 600", "budgets[0].leaseSeconds: leaseSeconds * 1000 must be more than 2 * refreshMillis"),
            ("policy: equal", "policy: equal\n    colour: blue", "unknown field `colour`"),
        ];
        for (from, to, want) in cases {
            let got = err(&GOOD.replace(from, to));
            assert!(got.contains(want), "{to:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn a_budget_listed_twice_is_refused() {
        let twice = format!("{GOOD}{}", GOOD.trim_start_matches("budgets:\n"));
        assert_eq!(
            err(&twice),
            "budgets[1].name: budget default/orders is listed twice"
        );
    }

    #[test]
    fn a_missing_field_is_named() {
        assert!(
            err(&GOOD.replace("    maxInFlight: 10\n", "")).contains("missing field `maxInFlight`")
        );
    }
}

//! The budgets file of the standalone coordinator (`pacer coordinator --budgets FILE`).
//!
//! ```yaml
//! budgets:
//!   - namespace: default
//!     name: orders
//!     messagesPerSecond: 100     # > 0, <= 1000000
//!     maxInFlight: 10            # 1..=100000
//!     policy: demand             # equal | demand (default demand)
//!     leaseSeconds: 10           # 1..=3600, lease * 1000 > 2 * refreshMillis
//!     refreshMillis: 1000        # 100..=600000
//!     expectedMembers: 3         # >= 1 (default 1)
//!     fallbackSeconds: 30        # optional, 0..=86400, default 3 * leaseSeconds
//!     token: change-me-please    # >= 16 characters
//! ```
//!
//! Parsing is pure; errors name the entry and the field, the value and what is accepted.
//! The rules this file shares with the CRD (bounds, names, policy spellings) come from
//! `pacer_rules`, so a budget is valid here exactly when it would be on a ThrottledConsumer.

use crate::ledger::BudgetConfig;
use crate::policy::Policy;
use crate::protocol::Share;
use crate::service::BudgetId;
use pacer_rules::limits::{
    self, fallback_seconds, lease_seconds, max_in_flight, rate, refresh_millis,
};
use pacer_rules::names::budget_name;
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
    #[serde(default, with = "crate::policy::by_name")]
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

/// Turns a rule's complaint into an error naming entry `index` and `name`.
fn at(index: usize, name: &'static str) -> impl Fn(String) -> FileError {
    move |problem| field(index, name, problem)
}

/// Parses and validates a budgets file.
pub fn parse(text: &str) -> Result<Vec<FileEntry>, FileError> {
    let doc: FileDoc = serde_yaml::from_str(text).map_err(|e| FileError::Parse(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(doc.budgets.len());
    for (i, b) in doc.budgets.into_iter().enumerate() {
        let entry = entry(i, b)?;
        if !seen.insert(entry.id.clone()) {
            let problem = format!("budget {} is listed twice", entry.id);
            return Err(field(i, "name", problem));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Validates entry `i`: the rules shared with the CRD first, then the file's own.
fn entry(i: usize, b: FileBudget) -> Result<FileEntry, FileError> {
    budget_name(&b.namespace).map_err(at(i, "namespace"))?;
    budget_name(&b.name).map_err(at(i, "name"))?;
    let rate = rate::check(b.messages_per_second).map_err(at(i, "messagesPerSecond"))?;
    let in_flight = max_in_flight::RANGE
        .check(b.max_in_flight)
        .map_err(at(i, "maxInFlight"))?;
    let lease_seconds = lease_seconds::RANGE
        .check(b.lease_seconds)
        .map_err(at(i, "leaseSeconds"))?;
    let refresh_millis = refresh_millis::RANGE
        .check(b.refresh_millis)
        .map_err(at(i, "refreshMillis"))?;
    limits::lease_outlives_refreshes(lease_seconds, refresh_millis)
        .map_err(at(i, "leaseSeconds"))?;

    // The file's own settings: the operator derives these from the replica count and the
    // lease, and generates the token.
    if !(1..=100_000).contains(&b.expected_members) {
        return Err(field(
            i,
            "expectedMembers",
            format!("must be 1 to 100000, got {}", b.expected_members),
        ));
    }
    let fallback_seconds = fallback_seconds::RANGE
        .check(
            b.fallback_seconds
                .unwrap_or_else(|| fallback_seconds::default_for(lease_seconds)),
        )
        .map_err(at(i, "fallbackSeconds"))?;
    if b.token.chars().count() < MIN_TOKEN_LEN {
        return Err(field(
            i,
            "token",
            format!("must be at least {MIN_TOKEN_LEN} characters"),
        ));
    }
    // The casts cannot truncate: every value was range-checked above.
    Ok(FileEntry {
        id: BudgetId::new(b.namespace, b.name),
        config: BudgetConfig {
            capacity: Share::new(rate, in_flight as u32),
            policy: b.policy,
            expected_members: b.expected_members as u32,
            lease_ms: lease_seconds as u64 * 1000,
            refresh_ms: refresh_millis as u64,
            fallback_ms: fallback_seconds as u64 * 1000,
        },
        token: b.token,
    })
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
        let short =
            parse(&GOOD.replace("policy: equal", "policy: equal\n    leaseSeconds: 4")).unwrap();
        assert_eq!(short[0].config.fallback_ms, 12_000, "3 leases");
        let none =
            parse(&GOOD.replace("policy: equal", "policy: equal\n    fallbackSeconds: 0")).unwrap();
        assert_eq!(none[0].config.fallback_ms, 0);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn each_bad_field_is_named_with_what_is_accepted() {
        let cases = [
            ("messagesPerSecond: 100", "messagesPerSecond: -1", "budgets[0].messagesPerSecond: -1 is out of range, must be greater than 0 and at most 1000000"),
            ("messagesPerSecond: 100", "messagesPerSecond: .nan", "budgets[0].messagesPerSecond: NaN is out of range, must be greater than 0 and at most 1000000"),
            ("messagesPerSecond: 100", "messagesPerSecond: 1000001", "budgets[0].messagesPerSecond: 1000001 is out of range, must be greater than 0 and at most 1000000"),
            ("maxInFlight: 10", "maxInFlight: 0", "budgets[0].maxInFlight: 0 is out of range, must be 1 to 100000"),
            ("maxInFlight: 10", "maxInFlight: 100001", "budgets[0].maxInFlight: 100001 is out of range, must be 1 to 100000"),
            ("policy: equal", "policy: equal\n    refreshMillis: 99", "budgets[0].refreshMillis: 99 is out of range, must be 100 to 600000"),
            ("policy: equal", "policy: equal\n    leaseSeconds: 3601", "budgets[0].leaseSeconds: 3601 is out of range, must be 1 to 3600"),
            ("expectedMembers: 3", "expectedMembers: 0", "budgets[0].expectedMembers: must be 1 to 100000, got 0"),
            ("token: 0123456789abcdef", "token: short", "budgets[0].token: must be at least 16 characters"),
            ("name: orders", "name: Orders", "budgets[0].name: must be 1 to 253 characters of a-z, 0-9, '-' or '.', got \"Orders\""),
            ("policy: equal", "policy: random", "unknown variant `random`, expected `equal` or `demand`"),
            ("policy: equal", "policy: equal\n    leaseSeconds: 1\n    refreshMillis: 600", "budgets[0].leaseSeconds: leaseSeconds * 1000 (1000) must be greater than 2 * refreshMillis (1200) so a lease survives a missed refresh"),
            ("policy: equal", "policy: equal\n    fallbackSeconds: -1", "budgets[0].fallbackSeconds: -1 is out of range, must be 0 to 86400"),
            ("policy: equal", "policy: equal\n    fallbackSeconds: 86401", "budgets[0].fallbackSeconds: 86401 is out of range, must be 0 to 86400"),
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

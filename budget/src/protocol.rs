//! The lease protocol's wire types (JSON over HTTP, camelCase field names).
//!
//! ```text
//! POST   /v1/budgets/{namespace}/{name}/leases          LeaseRequest -> Grant
//! DELETE /v1/budgets/{namespace}/{name}/leases/{member} 204
//! GET    /v1/budgets/{namespace}/{name}                 Snapshot
//! ```
//!
//! Every request type refuses unknown fields, so a typo in a client is a 400 and not a
//! silently ignored value. Validation that serde cannot express (finite, non-negative
//! rates; member name syntax) lives in [`LeaseRequest::validate`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// A share of a budget: a rate in messages per second and a number of messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Share {
    pub rate: f64,
    pub in_flight: u32,
}

impl Share {
    pub const ZERO: Share = Share {
        rate: 0.0,
        in_flight: 0,
    };

    pub fn new(rate: f64, in_flight: u32) -> Self {
        Self { rate, in_flight }
    }

    /// Component-wise maximum.
    pub fn max(self, other: Share) -> Share {
        Share::new(
            self.rate.max(other.rate),
            self.in_flight.max(other.in_flight),
        )
    }

    /// Component-wise minimum.
    pub fn min(self, other: Share) -> Share {
        Share::new(
            self.rate.min(other.rate),
            self.in_flight.min(other.in_flight),
        )
    }

    pub fn is_zero(&self) -> bool {
        self.rate <= 0.0 && self.in_flight == 0
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3} msg/s, {} in flight", self.rate, self.in_flight)
    }
}

/// `POST .../leases`: join or renew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseRequest {
    /// The member's stable name (the pod name under Kubernetes).
    pub member: String,
    /// What the member could use right now.
    pub demand: Share,
    /// What the member is using at the moment it sends this request (its current lease,
    /// its fallback share, or zero). Absent means zero.
    #[serde(default)]
    pub holding: Option<Share>,
    /// The fallback share that came with the lease it holds (what it would run at if
    /// that lease expired). Absent means the whole holding, the safe assumption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding_fallback: Option<Share>,
    /// The fallback window (`fallbackMs`) of the grant it holds: how long it would run
    /// at `holdingFallback` once that lease expired. Absent (older clients): the longest
    /// window the coordinator may have granted it, the safe assumption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding_fallback_ms: Option<u64>,
    /// Which run of the member's process sends this: random per process start. Under
    /// Kubernetes the replica also writes it to its container's termination message, so
    /// when the kubelet reports that container terminated the operator releases the
    /// member's lease at once, but only if no newer run of it has refreshed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// Messages per second the member actually processed recently (for status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_rate: Option<f64>,
}

impl LeaseRequest {
    /// Checks what serde cannot: names and finite, non-negative numbers. The error names
    /// the field and what is accepted.
    pub fn validate(&self) -> Result<(), String> {
        validate_member(&self.member)?;
        check_rate("demand.rate", self.demand.rate)?;
        if let Some(h) = &self.holding {
            check_rate("holding.rate", h.rate)?;
        }
        if let Some(h) = &self.holding_fallback {
            check_rate("holdingFallback.rate", h.rate)?;
        }
        if let Some(o) = self.observed_rate {
            check_rate("observedRate", o)?;
        }
        if let Some(i) = &self.incarnation {
            validate_incarnation(i).map_err(|e| format!("incarnation: {e}"))?;
        }
        if let Some(ms) = self.holding_fallback_ms {
            let max = pacer_rules::limits::fallback_seconds::MAX as u64 * 1000;
            if ms > max {
                return Err(format!(
                    "holdingFallbackMs: {ms} is out of range, must be 0 to {max}"
                ));
            }
        }
        Ok(())
    }
}

/// A member name is 1 to 253 characters of `[A-Za-z0-9._-]` (pod names qualify); the
/// rule is `pacer_rules::names::member_name`, which `pacer run --member` checks too.
pub fn validate_member(member: &str) -> Result<(), String> {
    pacer_rules::names::member_name(member).map_err(|e| format!("member: {e}"))
}

/// How a replica's termination message (Kubernetes' `/dev/termination-log`, which the
/// kubelet reports however the container ended, even after SIGKILL) names its run.
pub const TERMINATION_MESSAGE_PREFIX: &str = "pacer-incarnation=";

/// The termination message a replica writes at start.
pub fn termination_message(incarnation: &str) -> String {
    format!("{TERMINATION_MESSAGE_PREFIX}{incarnation}\n")
}

/// The run named in a container's termination message, if it is a valid one.
pub fn incarnation_in(message: &str) -> Option<&str> {
    message
        .lines()
        .find_map(|l| l.trim().strip_prefix(TERMINATION_MESSAGE_PREFIX))
        .filter(|i| validate_incarnation(i).is_ok())
}

/// An incarnation is 1 to 64 characters of `[0-9a-f]` (what [`crate::client::incarnation`]
/// makes), checked where the coordinator reads one: a lease request, a termination message.
pub fn validate_incarnation(text: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not 1 to 64 lowercase hexadecimal digits"
        ))
    }
}

fn check_rate(field: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("{field}: must be a finite number >= 0, got {v}"))
    }
}

/// `200` answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub rate: f64,
    pub in_flight: u32,
    /// The lease is valid for this long, counted by the client from when it *sent* the
    /// request (so the client's view expires no later than the coordinator's).
    pub lease_ms: u64,
    /// Refresh this often: the budget's refresh interval, or a quarter of it while the
    /// grant is short of this member's target (others still hold the room).
    pub refresh_ms: u64,
    /// What to run at after the lease expires without a renewal. Never more than the
    /// grant itself, so the fallbacks of all members fit the budget.
    pub fallback: Share,
    /// How long the fallback may be used after the lease expired; after that the member
    /// stops taking messages until it reaches a coordinator again.
    pub fallback_ms: u64,
    /// Changes when the coordinator restarts or the budget's configuration changes.
    pub epoch: u64,
}

impl Grant {
    pub fn share(&self) -> Share {
        Share::new(self.rate, self.in_flight)
    }
}

/// The JSON body of every 4xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One member as seen by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberSnapshot {
    pub member: String,
    /// The last grant sent.
    pub rate: f64,
    pub in_flight: u32,
    pub demand: Share,
    /// What the member reported holding in its last request.
    pub holding: Share,
    /// What the member may be using now, as the ledger counts it.
    pub charged: Share,
    pub observed_rate: Option<f64>,
    /// Milliseconds until the last grant expires (0 when expired).
    pub expires_in_ms: u64,
    pub state: MemberState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MemberState {
    /// Holds an unexpired lease.
    Live,
    /// The lease expired without renewal: the member crashed or cannot reach the
    /// coordinator, and may be running at its fallback share.
    Expired,
}

/// `GET /v1/budgets/{namespace}/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub namespace: String,
    pub name: String,
    pub capacity: Share,
    #[serde(with = "crate::policy::by_name")]
    pub policy: crate::Policy,
    pub expected_members: u32,
    pub epoch: u64,
    /// True while the coordinator is re-learning leases after a restart.
    pub learning: bool,
    /// Sum of the current grants of live members.
    pub granted: Share,
    /// Sum of what every member may be using now (never above capacity once settled).
    pub charged: Share,
    /// Sum of the rates members reported processing.
    pub observed_rate: f64,
    pub members: Vec<MemberSnapshot>,
}

//! Status of a `ThrottledConsumer`: pure, with the time passed in.
//!
//! [`compute`] turns what the reconciler observed (the validation result, the live
//! Deployment, the coordinator's snapshot) into a status; each condition comes from a
//! named function. [`materially_equal`] decides whether the new status is worth a write:
//! it ignores `lastTransitionTime`, lease expiry times and small rate wobbles, so status
//! is written when allocations change, not on every lease refresh.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::chrono::{DateTime, Duration as ChronoDuration, Utc};
use kube::ResourceExt;
use pacer_budget::{MemberState, Snapshot};

use crate::build::selector_string;
use crate::crd::{Allocation, ShareStatus, ThrottledConsumer, ThrottledConsumerStatus};
use crate::validate::{InvalidSpec, ValidSpec};

pub const READY: &str = "Ready";
pub const BALANCED: &str = "Balanced";
pub const DEGRADED: &str = "Degraded";
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Relative tolerance under which two rates count as the same for status writes and for
/// "converged": 2 % is below what a user reads off `kubectl get` and above the float
/// noise of water-filling.
pub const RATE_TOLERANCE: f64 = 0.02;
/// Observed rates are measured, not allocated, and wobble more.
pub const OBSERVED_RATE_TOLERANCE: f64 = 0.10;
/// Most members named in a `Degraded` message.
const MAX_NAMED_MEMBERS: usize = 5;

/// What the reconciler observed, for [`compute`].
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub validation: Result<&'a ValidSpec, &'a InvalidSpec>,
    /// The live Deployment (after apply), if it exists.
    pub deployment: Option<&'a Deployment>,
    /// The budget as the coordinator sees it, if registered.
    pub snapshot: Option<&'a Snapshot>,
}

/// The status to write, given the observations and the current time.
pub fn compute(
    tc: &ThrottledConsumer,
    obs: Observed<'_>,
    now: DateTime<Utc>,
) -> ThrottledConsumerStatus {
    let old = tc.status.clone().unwrap_or_default();
    let generation = tc.metadata.generation;
    let dstatus = obs.deployment.and_then(|d| d.status.as_ref());
    let replicas = dstatus.and_then(|s| s.replicas).unwrap_or(0);
    let ready_replicas = dstatus.and_then(|s| s.ready_replicas).unwrap_or(0);

    let conditions = vec![
        ready_condition(&obs, ready_replicas),
        balanced_condition(obs.snapshot),
        degraded_condition(obs.snapshot),
        invalid_spec_condition(obs.validation),
    ]
    .into_iter()
    .map(|c| finish_condition(c, &old.conditions, generation, now))
    .collect();

    let (allocations, granted_rate, granted_in_flight, observed_rate) = match obs.snapshot {
        Some(s) => (
            allocations(s, now),
            round3(s.granted.rate),
            to_i32(s.granted.in_flight),
            round3(s.observed_rate),
        ),
        None => (Vec::new(), 0.0, 0, 0.0),
    };

    ThrottledConsumerStatus {
        observed_generation: generation,
        replicas,
        ready_replicas,
        selector: selector_string(tc),
        conditions,
        allocations,
        granted_rate,
        granted_in_flight,
        observed_rate,
    }
}

/// A condition before its time and generation are filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

fn cond(
    type_: &'static str,
    ok: Option<bool>,
    reason: &'static str,
    message: impl Into<String>,
) -> Cond {
    Cond {
        type_,
        status: match ok {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        },
        reason,
        message: message.into(),
    }
}

/// `Ready`: the spec is valid, the budget is registered and every desired replica is
/// ready.
pub fn ready_condition(obs: &Observed<'_>, ready_replicas: i32) -> Cond {
    let v = match obs.validation {
        Err(e) => return cond(READY, Some(false), "InvalidSpec", e.to_string()),
        Ok(v) => v,
    };
    if v.spec.paused {
        return cond(
            READY,
            Some(false),
            "Paused",
            "spec.paused is true: scaled to zero",
        );
    }
    if obs.snapshot.is_none() {
        return cond(
            READY,
            Some(false),
            "BudgetNotRegistered",
            "the budget is not registered with the coordinator yet",
        );
    }
    let desired = v.desired_replicas();
    if obs.deployment.is_none() {
        return cond(
            READY,
            Some(false),
            "DeploymentMissing",
            "the Deployment does not exist yet",
        );
    }
    if ready_replicas < desired {
        return cond(
            READY,
            Some(false),
            "ReplicasNotReady",
            format!("{ready_replicas} of {desired} replicas are ready"),
        );
    }
    cond(
        READY,
        Some(true),
        "AllReplicasReady",
        format!("{ready_replicas} of {desired} replicas are ready"),
    )
}

/// `Balanced`: the leases have converged to the policy: as many live members as expected,
/// each holding the share it was last granted, and the grants add up to the budget.
pub fn balanced_condition(snapshot: Option<&Snapshot>) -> Cond {
    let Some(s) = snapshot else {
        return cond(
            BALANCED,
            None,
            "BudgetNotRegistered",
            "the budget is not registered with the coordinator yet",
        );
    };
    if s.learning {
        return cond(
            BALANCED,
            Some(false),
            "Learning",
            "the coordinator restarted recently and is re-learning the leases members hold",
        );
    }
    let live: Vec<_> = s
        .members
        .iter()
        .filter(|m| m.state == MemberState::Live)
        .collect();
    if s.expected_members == 0 && live.is_empty() {
        return cond(
            BALANCED,
            Some(true),
            "NoMembers",
            "no replicas are expected",
        );
    }
    if live.len() as u32 != s.expected_members {
        return cond(
            BALANCED,
            Some(false),
            "MembersChanging",
            format!(
                "{} of {} expected replicas hold a lease",
                live.len(),
                s.expected_members
            ),
        );
    }
    let settled = live
        .iter()
        .filter(|m| {
            rate_close(m.holding.rate, m.rate, RATE_TOLERANCE) && m.holding.in_flight == m.in_flight
        })
        .count();
    if settled < live.len() {
        return cond(
            BALANCED,
            Some(false),
            "Converging",
            format!(
                "{settled} of {} replicas hold their granted share",
                live.len()
            ),
        );
    }
    if !rate_close(s.granted.rate, s.capacity.rate, RATE_TOLERANCE) {
        return cond(
            BALANCED,
            Some(false),
            "Converging",
            format!(
                "{:.3} of {:.3} msg/s granted",
                s.granted.rate, s.capacity.rate
            ),
        );
    }
    cond(
        BALANCED,
        Some(true),
        "Converged",
        format!(
            "{} replicas hold their share of {:.3} msg/s",
            live.len(),
            s.capacity.rate
        ),
    )
}

/// `Degraded`: some members' leases expired (crashed, or cut off from the operator and
/// running on their fallback share).
pub fn degraded_condition(snapshot: Option<&Snapshot>) -> Cond {
    let Some(s) = snapshot else {
        return cond(
            DEGRADED,
            None,
            "BudgetNotRegistered",
            "the budget is not registered with the coordinator yet",
        );
    };
    let expired: Vec<&str> = s
        .members
        .iter()
        .filter(|m| m.state == MemberState::Expired)
        .map(|m| m.member.as_str())
        .collect();
    if expired.is_empty() {
        return cond(
            DEGRADED,
            Some(false),
            "LeasesLive",
            "every member holds a live lease",
        );
    }
    let mut named = expired
        .iter()
        .take(MAX_NAMED_MEMBERS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if expired.len() > MAX_NAMED_MEMBERS {
        named.push_str(&format!(" and {} more", expired.len() - MAX_NAMED_MEMBERS));
    }
    cond(
        DEGRADED,
        Some(true),
        "LeasesExpired",
        format!("{} member(s) stopped refreshing their lease and may run on their fallback share: {named}", expired.len()),
    )
}

/// `InvalidSpec`: true with a message naming every bad field.
pub fn invalid_spec_condition(validation: Result<&ValidSpec, &InvalidSpec>) -> Cond {
    match validation {
        Ok(_) => cond(INVALID_SPEC, Some(false), "Valid", "the spec is valid"),
        Err(e) => cond(INVALID_SPEC, Some(true), "InvalidSpec", e.to_string()),
    }
}

/// Fills in generation and `lastTransitionTime`, keeping the old time when the status of
/// the condition did not change.
fn finish_condition(
    c: Cond,
    old: &[Condition],
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let since = old
        .iter()
        .find(|o| o.type_ == c.type_ && o.status == c.status)
        .map(|o| o.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: c.type_.into(),
        status: c.status.into(),
        reason: c.reason.into(),
        message: c.message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

fn allocations(s: &Snapshot, now: DateTime<Utc>) -> Vec<Allocation> {
    let mut out: Vec<Allocation> = s
        .members
        .iter()
        .map(|m| Allocation {
            member: m.member.clone(),
            rate: round3(m.rate),
            in_flight: to_i32(m.in_flight),
            demand: ShareStatus {
                rate: round3(m.demand.rate),
                in_flight: to_i32(m.demand.in_flight),
            },
            // Whole seconds: a status is not a clock.
            expires_at: (m.expires_in_ms > 0).then(|| {
                let t = now
                    + ChronoDuration::milliseconds(
                        i64::try_from(m.expires_in_ms).unwrap_or(i64::MAX / 2),
                    );
                Time(DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t))
            }),
            state: match m.state {
                MemberState::Live => "Live".into(),
                MemberState::Expired => "Expired".into(),
            },
        })
        .collect();
    out.sort_by(|a, b| a.member.cmp(&b.member));
    out
}

/// Whether writing `new` over `old` would tell a user anything: conditions compared
/// without `lastTransitionTime`, allocations without `expiresAt`, rates within
/// tolerance.
pub fn materially_equal(old: &ThrottledConsumerStatus, new: &ThrottledConsumerStatus) -> bool {
    let conds = |s: &ThrottledConsumerStatus| {
        let mut v: Vec<_> = s
            .conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                    c.observed_generation,
                )
            })
            .collect();
        v.sort();
        v
    };
    old.observed_generation == new.observed_generation
        && old.replicas == new.replicas
        && old.ready_replicas == new.ready_replicas
        && old.selector == new.selector
        && conds(old) == conds(new)
        && old.granted_in_flight == new.granted_in_flight
        && rate_close(old.granted_rate, new.granted_rate, RATE_TOLERANCE)
        && rate_close(
            old.observed_rate,
            new.observed_rate,
            OBSERVED_RATE_TOLERANCE,
        )
        && old.allocations.len() == new.allocations.len()
        && old.allocations.iter().zip(&new.allocations).all(|(a, b)| {
            a.member == b.member
                && a.state == b.state
                && a.in_flight == b.in_flight
                && a.demand.in_flight == b.demand.in_flight
                && rate_close(a.rate, b.rate, RATE_TOLERANCE)
                && rate_close(a.demand.rate, b.demand.rate, RATE_TOLERANCE)
        })
}

/// `a` and `b` within `tolerance` of the larger, or both below 0.01 msg/s apart.
fn rate_close(a: f64, b: f64, tolerance: f64) -> bool {
    let diff = (a - b).abs();
    diff <= 0.01 || diff <= tolerance * a.abs().max(b.abs())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Name of the object, for logs.
pub fn object_ref(tc: &ThrottledConsumer) -> String {
    format!("{}/{}", tc.namespace().unwrap_or_default(), tc.name_any())
}

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

/// Status of an object that does not parse: `InvalidSpec` and not `Ready`, with the
/// parser's message.
pub fn unparseable(
    name: &str,
    error: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> ThrottledConsumerStatus {
    let message = format!("the object does not parse as a ThrottledConsumer: {error}");
    let conditions = [
        cond(READY, Some(false), "InvalidSpec", message.clone()),
        cond(INVALID_SPEC, Some(true), "InvalidSpec", message),
    ]
    .into_iter()
    .map(|c| finish_condition(c, &[], generation, now))
    .collect();
    ThrottledConsumerStatus {
        observed_generation: generation,
        selector: crate::build::selector_string_for(name),
        conditions,
        ..Default::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{now, tc_from_yaml, ORDERS_SYNC};
    use crate::validate::validate;
    use pacer_budget::{MemberSnapshot, Policy, Share};
    use serde_json::json;

    fn member(
        name: &str,
        rate: f64,
        in_flight: u32,
        holding: f64,
        state: MemberState,
    ) -> MemberSnapshot {
        MemberSnapshot {
            member: name.into(),
            rate,
            in_flight,
            demand: Share::new(100.0, 5),
            holding: Share::new(holding, in_flight),
            charged: Share::new(holding, in_flight),
            observed_rate: Some(holding * 0.9),
            expires_in_ms: if state == MemberState::Live { 9_400 } else { 0 },
            state,
        }
    }

    fn snapshot(members: Vec<MemberSnapshot>) -> Snapshot {
        let live = members.iter().filter(|m| m.state == MemberState::Live);
        let granted = live.fold(Share::ZERO, |s, m| {
            Share::new(s.rate + m.rate, s.in_flight + m.in_flight)
        });
        Snapshot {
            namespace: "shop".into(),
            name: "orders-sync".into(),
            capacity: Share::new(12.0, 6),
            policy: Policy::Equal,
            expected_members: 3,
            epoch: 4,
            learning: false,
            granted,
            charged: granted,
            observed_rate: members.iter().filter_map(|m| m.observed_rate).sum(),
            members,
        }
    }

    fn balanced() -> Snapshot {
        snapshot(vec![
            member("orders-sync-7d9f-c", 4.0, 2, 4.0, MemberState::Live),
            member("orders-sync-7d9f-a", 4.0, 2, 4.0, MemberState::Live),
            member("orders-sync-7d9f-b", 4.0, 2, 4.0, MemberState::Live),
        ])
    }

    fn ready_deployment(ready: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "orders-sync"},
            "status": {"replicas": 3, "readyReplicas": ready}
        }))
        .unwrap()
    }

    fn get<'a>(s: &'a ThrottledConsumerStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn healthy_fleet_is_ready_balanced_not_degraded_with_sorted_allocations() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let v = validate(&tc.spec).unwrap();
        let (d, s) = (ready_deployment(3), balanced());
        let st = compute(
            &tc,
            Observed {
                validation: Ok(&v),
                deployment: Some(&d),
                snapshot: Some(&s),
            },
            now(),
        );

        assert_eq!(
            (st.replicas, st.ready_replicas, st.observed_generation),
            (3, 3, Some(1))
        );
        let summary: Vec<(&str, &str, &str)> = st
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("Ready", "True", "AllReplicasReady"),
                ("Balanced", "True", "Converged"),
                ("Degraded", "False", "LeasesLive"),
                ("InvalidSpec", "False", "Valid"),
            ]
        );
        assert_eq!(
            (st.granted_rate, st.granted_in_flight, st.observed_rate),
            (12.0, 6, 10.8)
        );
        let members: Vec<&str> = st.allocations.iter().map(|a| a.member.as_str()).collect();
        assert_eq!(
            members,
            [
                "orders-sync-7d9f-a",
                "orders-sync-7d9f-b",
                "orders-sync-7d9f-c"
            ]
        );
        assert_eq!(
            st.allocations[0]
                .expires_at
                .as_ref()
                .unwrap()
                .0
                .to_rfc3339(),
            "2026-01-02T03:04:14+00:00",
            "now + 9.4 s, in whole seconds"
        );
        assert!(get(&st, READY).last_transition_time.0 == now());
    }

    #[test]
    fn invalid_spec_sets_invalid_spec_and_ready_false_with_the_field_message() {
        let mut tc = tc_from_yaml(ORDERS_SYNC);
        tc.spec.budget.messages_per_second = 0.0;
        let err = validate(&tc.spec).unwrap_err();
        let st = compute(
            &tc,
            Observed {
                validation: Err(&err),
                deployment: None,
                snapshot: None,
            },
            now(),
        );
        let msg = "spec.budget.messagesPerSecond: 0 is out of range, must be greater than 0 and at most 1000000";
        assert_eq!(
            (
                get(&st, INVALID_SPEC).status.as_str(),
                get(&st, INVALID_SPEC).message.as_str()
            ),
            ("True", msg)
        );
        assert_eq!(
            (
                get(&st, READY).status.as_str(),
                get(&st, READY).reason.as_str()
            ),
            ("False", "InvalidSpec")
        );
    }

    #[test]
    fn members_still_shrinking_after_a_scale_up_are_not_balanced() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let v = validate(&tc.spec).unwrap();
        let mut s = balanced();
        s.members[0].rate = 2.4; // granted less, still holding 4
        let st = compute(
            &tc,
            Observed {
                validation: Ok(&v),
                deployment: None,
                snapshot: Some(&s),
            },
            now(),
        );
        let b = get(&st, BALANCED);
        assert_eq!(
            (b.status.as_str(), b.reason.as_str(), b.message.as_str()),
            (
                "False",
                "Converging",
                "2 of 3 replicas hold their granted share"
            )
        );

        let mut s = balanced();
        s.expected_members = 5;
        let b = balanced_condition(Some(&s));
        assert_eq!(
            (b.reason, b.message.as_str()),
            ("MembersChanging", "3 of 5 expected replicas hold a lease")
        );
    }

    #[test]
    fn a_learning_coordinator_is_not_balanced() {
        let mut s = balanced();
        s.learning = true;
        assert_eq!(balanced_condition(Some(&s)).reason, "Learning");
    }

    #[test]
    fn expired_leases_make_the_fleet_degraded_naming_the_members() {
        let mut s = balanced();
        s.members.push(member(
            "orders-sync-old-x",
            4.0,
            2,
            4.0,
            MemberState::Expired,
        ));
        let d = degraded_condition(Some(&s));
        assert_eq!((d.status, d.reason), ("True", "LeasesExpired"));
        assert_eq!(d.message, "1 member(s) stopped refreshing their lease and may run on their fallback share: orders-sync-old-x");
    }

    #[test]
    fn paused_and_missing_budget_are_not_ready_with_their_reasons() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let mut v = validate(&tc.spec).unwrap();
        let d = ready_deployment(3);
        let obs = Observed {
            validation: Ok(&v),
            deployment: Some(&d),
            snapshot: None,
        };
        assert_eq!(ready_condition(&obs, 3).reason, "BudgetNotRegistered");
        v.spec.paused = true;
        let obs = Observed {
            validation: Ok(&v),
            deployment: Some(&d),
            snapshot: None,
        };
        assert_eq!(ready_condition(&obs, 0).reason, "Paused");
    }

    #[test]
    fn transition_time_is_kept_while_a_condition_keeps_its_status() {
        let mut tc = tc_from_yaml(ORDERS_SYNC);
        let v = validate(&tc.spec).unwrap();
        let s = balanced();
        let d2 = ready_deployment(2);
        let first = compute(
            &tc,
            Observed {
                validation: Ok(&v),
                deployment: Some(&d2),
                snapshot: Some(&s),
            },
            now(),
        );
        tc.status = Some(first.clone());
        let later = now() + ChronoDuration::seconds(30);

        let same = compute(
            &tc,
            Observed {
                validation: Ok(&v),
                deployment: Some(&d2),
                snapshot: Some(&s),
            },
            later,
        );
        assert_eq!(get(&same, READY).last_transition_time.0, now());

        let d3 = ready_deployment(3);
        let flipped = compute(
            &tc,
            Observed {
                validation: Ok(&v),
                deployment: Some(&d3),
                snapshot: Some(&s),
            },
            later,
        );
        assert_eq!(get(&flipped, READY).last_transition_time.0, later);
        assert_eq!(get(&flipped, BALANCED).last_transition_time.0, now());
    }

    #[test]
    fn status_is_rewritten_only_when_it_changes_materially() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let v = validate(&tc.spec).unwrap();
        let d = ready_deployment(3);
        let s = balanced();
        let at = |s: &Snapshot, t| {
            compute(
                &tc,
                Observed {
                    validation: Ok(&v),
                    deployment: Some(&d),
                    snapshot: Some(s),
                },
                t,
            )
        };
        let base = at(&s, now());

        // A lease refresh moves expiry times and transition times: not material.
        let mut refreshed = s.clone();
        refreshed.members[1].expires_in_ms = 3_000;
        let mut later = at(&refreshed, now() + ChronoDuration::seconds(7));
        for c in &mut later.conditions {
            c.last_transition_time = Time(now() + ChronoDuration::seconds(7));
        }
        assert!(materially_equal(&base, &later));

        // Observed rate wobbling by 5 %: not material.
        let mut wobble = s.clone();
        wobble.observed_rate *= 1.05;
        assert!(materially_equal(&base, &at(&wobble, now())));

        // A member's grant moving by 25 %, or a member leaving: material.
        let mut moved = s.clone();
        moved.members[0].rate = 3.0;
        assert!(!materially_equal(&base, &at(&moved, now())));
        let mut left = s.clone();
        left.members.pop();
        assert!(!materially_equal(&base, &at(&left, now())));
    }
}

//! Kubernetes Events: what a user reads under `Events:` in `kubectl describe tc`.
//!
//! | reason | type | when |
//! |--------|------|------|
//! | `InvalidSpec` | Warning | the operator refuses a spec the API server accepted (once per problem, not per reconcile) |
//! | `BudgetRegistered` | Normal | the coordinator starts serving the budget (a new object, or after an operator restart) |
//! | `Scaled` | Normal | the desired replicas changed (`kubectl scale`, an HPA, `spec.paused`) |
//! | `BudgetChanged` | Normal | the rate, in-flight budget or policy changed |
//! | `LeasesExpired` | Warning | replicas stopped refreshing their lease (crashed, or cut off from the operator) |
//!
//! Deciding is pure ([`invalid_spec`], [`budget_changes`], [`newly_expired`]): each
//! compares what the user was last told (the object's status, the coordinator's budget
//! before the reconcile, the members already reported) with what holds now.
//! [`reconcile_and_tell`] wraps the reconciler: it notes the budget before, runs the
//! reconcile, and only after a successful one publishes what changed, through kube's
//! [`Recorder`] (`events.k8s.io/v1`, which `kubectl describe` shows). A failed publish
//! is logged and counted, never a failed reconcile: events are for people, the status is
//! the contract.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use pacer_budget::service::BudgetId;
use pacer_budget::{MemberState, Snapshot};
use tracing::warn;

use crate::crd::{ThrottledConsumer, ThrottledConsumerStatus};
use crate::metrics::CategoryLabels;
use crate::reconcile::{reconcile, Context, Error};
use crate::status::INVALID_SPEC;
use crate::validate::validate;

/// `reportingController` of every event (`From` in `kubectl describe`).
pub const REPORTER: &str = "pacer-operator";

pub const BUDGET_REGISTERED: &str = "BudgetRegistered";
pub const SCALED: &str = "Scaled";
pub const BUDGET_CHANGED: &str = "BudgetChanged";
pub const LEASES_EXPIRED: &str = "LeasesExpired";

/// The API server refuses an event note over 1 KiB.
pub const MAX_NOTE_BYTES: usize = 1024;
/// Most members named in a `LeasesExpired` note.
const MAX_NAMED_MEMBERS: usize = 5;

/// An event decided on, before it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub type_: EventType,
    pub reason: &'static str,
    /// What the operator did or checked (`Validate`, `Scale`, ...): the Event's `action`.
    pub action: &'static str,
    pub note: String,
}

impl Planned {
    fn new(type_: EventType, reason: &'static str, action: &'static str, note: String) -> Self {
        Planned {
            type_,
            reason,
            action,
            note: truncate(note, MAX_NOTE_BYTES),
        }
    }
}

/// `InvalidSpec` unless `old` (the status the user sees now) already reports exactly
/// these `problems`: one event per distinct problem, however often it is reconciled.
pub fn invalid_spec(old: Option<&ThrottledConsumerStatus>, problems: &str) -> Option<Planned> {
    let told = old
        .into_iter()
        .flat_map(|s| &s.conditions)
        .any(|c| c.type_ == INVALID_SPEC && c.status == "True" && c.message == problems);
    (!told).then(|| {
        Planned::new(
            EventType::Warning,
            INVALID_SPEC,
            "Validate",
            format!("{problems}; the Deployment and the budget are left as they are until the spec changes"),
        )
    })
}

/// Events for the budget's settings `before` and `after` one reconcile: registered,
/// scaled (expected members, which is the desired replicas), changed (capacity or
/// policy). `paused`: whether the spec now asks for no replicas.
pub fn budget_changes(before: Option<&Snapshot>, after: &Snapshot, paused: bool) -> Vec<Planned> {
    let Some(before) = before else {
        return vec![Planned::new(
            EventType::Normal,
            BUDGET_REGISTERED,
            "RegisterBudget",
            format!(
                "the coordinator serves {} to {} replica(s){}",
                budget_text(after),
                after.expected_members,
                if after.learning {
                    " (learning: the coordinator started recently, so for one lease plus the fallback window no member gets more than it reports holding)"
                } else {
                    ""
                }
            ),
        )];
    };
    let mut out = Vec::new();
    if before.expected_members != after.expected_members {
        out.push(Planned::new(
            EventType::Normal,
            SCALED,
            "Scale",
            format!(
                "scaled from {} to {} replicas{}",
                before.expected_members,
                after.expected_members,
                if paused { " (spec.paused)" } else { "" }
            ),
        ));
    }
    if before.capacity != after.capacity || before.policy != after.policy {
        out.push(Planned::new(
            EventType::Normal,
            BUDGET_CHANGED,
            "UpdateBudget",
            format!(
                "budget changed from {} to {}; replicas get their new share on their next refresh",
                budget_text(before),
                budget_text(after)
            ),
        ));
    }
    out
}

fn budget_text(s: &Snapshot) -> String {
    format!(
        "{} msg/s and {} in flight ({} policy)",
        s.capacity.rate, s.capacity.in_flight, s.policy
    )
}

/// `LeasesExpired` for members whose lease expired since `told` (the expired members
/// already reported), and the expired members to remember now. A member that refreshes
/// again leaves the set, so a second expiry is reported again.
pub fn newly_expired(
    told: &BTreeSet<String>,
    after: &Snapshot,
) -> (Option<Planned>, BTreeSet<String>) {
    let expired: BTreeSet<String> = after
        .members
        .iter()
        .filter(|m| m.state == MemberState::Expired)
        .map(|m| m.member.clone())
        .collect();
    let new: Vec<&str> = expired.difference(told).map(String::as_str).collect();
    if new.is_empty() {
        return (None, expired);
    }
    let mut named = new
        .iter()
        .take(MAX_NAMED_MEMBERS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if new.len() > MAX_NAMED_MEMBERS {
        named.push_str(&format!(" and {} more", new.len() - MAX_NAMED_MEMBERS));
    }
    let planned = Planned::new(
        EventType::Warning,
        LEASES_EXPIRED,
        "ExpireLeases",
        format!(
            "{} replica(s) stopped refreshing their lease (crashed, or cannot reach the operator) and may run on their fallback share: {named}",
            new.len()
        ),
    );
    (Some(planned), expired)
}

/// `s` cut to at most `max` bytes on a character boundary, marked with `...`.
pub fn truncate(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// What was told, per object, where the object itself cannot say it.
#[derive(Debug, Default)]
struct Told {
    /// Expired members already reported.
    expired: HashMap<BudgetId, BTreeSet<String>>,
    /// Generation of each unparseable object already reported (it has no typed status).
    unparseable: HashMap<BudgetId, Option<i64>>,
}

/// The recorder and the memory of what was told.
pub struct Events {
    recorder: Recorder,
    told: Mutex<Told>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// Events reported as [`REPORTER`], instance the host name (the pod's name).
    pub fn new(client: Client) -> Self {
        Events {
            recorder: Recorder::new(client, Reporter::from(REPORTER)),
            told: Mutex::default(),
        }
    }

    fn told(&self) -> std::sync::MutexGuard<'_, Told> {
        self.told.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets objects that no longer exist.
    pub fn retain(&self, live: &HashSet<BudgetId>) {
        let mut told = self.told();
        told.expired.retain(|id, _| live.contains(id));
        told.unparseable.retain(|id, _| live.contains(id));
    }

    /// What to tell about `guard` after a successful reconcile, given the budget
    /// `before` it. Updates the memory.
    fn plan(
        &self,
        guard: &DeserializeGuard<ThrottledConsumer>,
        ctx: &Context,
        before: Option<&Snapshot>,
    ) -> Vec<Planned> {
        let id = id_of(guard);
        let tc = match &guard.0 {
            Ok(tc) => tc,
            Err(invalid) => {
                let generation = invalid.metadata.generation;
                let mut told = self.told();
                if told.unparseable.get(&id) == Some(&generation) {
                    return Vec::new();
                }
                told.unparseable.insert(id, generation);
                let problem = format!(
                    "the object does not parse as a ThrottledConsumer: {}",
                    invalid.error
                );
                return invalid_spec(None, &problem).into_iter().collect();
            }
        };
        self.told().unparseable.remove(&id);
        let valid = match validate(&tc.spec) {
            Ok(v) => v,
            Err(problems) => {
                return invalid_spec(tc.status.as_ref(), &problems.to_string())
                    .into_iter()
                    .collect()
            }
        };
        let Some(after) = ctx.coordinator.snapshot(&id) else {
            return Vec::new();
        };
        let mut out = budget_changes(before, &after, valid.spec.paused);
        let mut told = self.told();
        let (expired, now) =
            newly_expired(told.expired.get(&id).unwrap_or(&BTreeSet::new()), &after);
        told.expired.insert(id, now);
        out.extend(expired);
        out
    }

    async fn publish(&self, ctx: &Context, reference: &ObjectReference, planned: Planned) {
        let event = Event {
            type_: planned.type_,
            reason: planned.reason.into(),
            note: Some(planned.note),
            action: planned.action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, reference).await {
            Ok(()) => ctx.metrics.write("event", "create"),
            Err(e) => {
                ctx.metrics
                    .failures
                    .get_or_create(&CategoryLabels {
                        category: "publish_event",
                    })
                    .inc();
                warn!(
                    object = %format!("{}/{}", reference.namespace.as_deref().unwrap_or_default(), reference.name.as_deref().unwrap_or_default()),
                    reason = planned.reason,
                    error = %e,
                    "Publishing an event failed (check the operator's RBAC for events.k8s.io events create/patch)"
                );
            }
        }
    }
}

fn id_of(guard: &DeserializeGuard<ThrottledConsumer>) -> BudgetId {
    BudgetId::new(
        guard.meta().namespace.clone().unwrap_or_default(),
        guard.meta().name.clone().unwrap_or_default(),
    )
}

/// The object an event is about. An unparseable object has no typed value, only its
/// metadata.
fn reference(guard: &DeserializeGuard<ThrottledConsumer>) -> ObjectReference {
    match &guard.0 {
        Ok(tc) => tc.object_ref(&()),
        Err(invalid) => ObjectReference {
            api_version: Some(ThrottledConsumer::api_version(&()).into()),
            kind: Some(ThrottledConsumer::kind(&()).into()),
            name: invalid.metadata.name.clone(),
            namespace: invalid.metadata.namespace.clone(),
            uid: invalid.metadata.uid.clone(),
            resource_version: invalid.metadata.resource_version.clone(),
            ..Default::default()
        },
    }
}

/// The reconciler as the controller runs it: [`reconcile`], then the events for what it
/// changed. Nothing is told about a reconcile that failed: it is retried, and tells
/// once it succeeds.
pub async fn reconcile_and_tell(
    guard: Arc<DeserializeGuard<ThrottledConsumer>>,
    ctx: Arc<Context>,
    events: Arc<Events>,
) -> Result<Action, Error> {
    let before = ctx.coordinator.snapshot(&id_of(&guard));
    let action = reconcile(guard.clone(), ctx.clone()).await?;
    let planned = events.plan(&guard, &ctx, before.as_ref());
    if !planned.is_empty() {
        let reference = reference(&guard);
        for p in planned {
            events.publish(&ctx, &reference, p).await;
        }
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use pacer_budget::{MemberSnapshot, Policy, Share};

    fn snapshot(rate: f64, in_flight: u32, policy: Policy, expected: u32) -> Snapshot {
        Snapshot {
            namespace: "shop".into(),
            name: "orders".into(),
            capacity: Share::new(rate, in_flight),
            policy,
            expected_members: expected,
            epoch: 1,
            learning: false,
            granted: Share::ZERO,
            charged: Share::ZERO,
            observed_rate: 0.0,
            members: Vec::new(),
        }
    }

    fn member(name: &str, state: MemberState) -> MemberSnapshot {
        MemberSnapshot {
            member: name.into(),
            rate: 1.0,
            in_flight: 1,
            demand: Share::ZERO,
            holding: Share::ZERO,
            charged: Share::ZERO,
            observed_rate: None,
            expires_in_ms: 0,
            state,
        }
    }

    fn status_with_invalid(status: &str, message: &str) -> ThrottledConsumerStatus {
        ThrottledConsumerStatus {
            conditions: vec![Condition {
                type_: INVALID_SPEC.into(),
                status: status.into(),
                reason: "InvalidSpec".into(),
                message: message.into(),
                observed_generation: Some(1),
                last_transition_time: Time(crate::fixtures::now()),
            }],
            ..Default::default()
        }
    }

    const PROBLEM: &str = "spec.kafka.config: enable.auto.offset.store is set by pacer run";

    #[test]
    fn invalid_spec_is_a_warning_naming_the_problem_once() {
        let first = invalid_spec(None, PROBLEM).unwrap();
        assert_eq!(first.type_, EventType::Warning);
        assert_eq!(first.reason, "InvalidSpec");
        assert!(first.note.starts_with(PROBLEM), "{}", first.note);
        // The status written by that reconcile says so: nothing more to tell.
        assert_eq!(
            invalid_spec(Some(&status_with_invalid("True", PROBLEM)), PROBLEM),
            None
        );
        // A different problem, or a spec that was valid before, is told again.
        assert!(invalid_spec(Some(&status_with_invalid("True", "other")), PROBLEM).is_some());
        assert!(invalid_spec(Some(&status_with_invalid("False", "")), PROBLEM).is_some());
    }

    #[test]
    fn a_new_budget_is_registered_and_nothing_else_is_told() {
        let after = snapshot(50.0, 10, Policy::Demand, 1);
        let out = budget_changes(None, &after, false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, BUDGET_REGISTERED);
        assert_eq!(
            out[0].note,
            "the coordinator serves 50 msg/s and 10 in flight (demand policy) to 1 replica(s)"
        );
    }

    #[test]
    fn scaling_and_budget_edits_are_told_and_an_unchanged_budget_is_not() {
        let one = snapshot(50.0, 10, Policy::Demand, 1);
        assert!(budget_changes(Some(&one), &one.clone(), false).is_empty());

        let three = snapshot(50.0, 10, Policy::Demand, 3);
        let out = budget_changes(Some(&one), &three, false);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].type_, out[0].reason, out[0].note.as_str()),
            (EventType::Normal, SCALED, "scaled from 1 to 3 replicas")
        );

        let paused = snapshot(50.0, 10, Policy::Demand, 0);
        assert_eq!(
            budget_changes(Some(&three), &paused, true)[0].note,
            "scaled from 3 to 0 replicas (spec.paused)"
        );

        let faster = snapshot(100.0, 20, Policy::Equal, 3);
        let out = budget_changes(Some(&three), &faster, false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, BUDGET_CHANGED);
        assert_eq!(
            out[0].note,
            "budget changed from 50 msg/s and 10 in flight (demand policy) to 100 msg/s and 20 in flight (equal policy); replicas get their new share on their next refresh"
        );

        // Both at once: two events.
        let both = snapshot(12.5, 20, Policy::Equal, 5);
        let reasons: Vec<_> = budget_changes(Some(&faster), &both, false)
            .iter()
            .map(|p| p.reason)
            .collect();
        assert_eq!(reasons, vec![SCALED, BUDGET_CHANGED]);
    }

    #[test]
    fn an_expired_lease_is_told_once_and_again_after_the_member_came_back() {
        let mut s = snapshot(50.0, 10, Policy::Demand, 2);
        s.members = vec![
            member("a", MemberState::Live),
            member("b", MemberState::Expired),
        ];
        let (first, told) = newly_expired(&BTreeSet::new(), &s);
        let first = first.unwrap();
        assert_eq!(
            (first.type_, first.reason),
            (EventType::Warning, LEASES_EXPIRED)
        );
        assert!(first.note.ends_with("fallback share: b"), "{}", first.note);
        assert_eq!(told, BTreeSet::from(["b".to_string()]));

        // Still expired: nothing new.
        let (again, told) = newly_expired(&told, &s);
        assert_eq!(again, None);

        // b refreshed, then expired again: told again.
        s.members[1].state = MemberState::Live;
        let (none, told) = newly_expired(&told, &s);
        assert_eq!((none, told.len()), (None, 0));
        s.members[1].state = MemberState::Expired;
        assert!(newly_expired(&told, &s).0.is_some());
    }

    #[test]
    fn many_expired_members_are_counted_and_the_first_five_named() {
        let mut s = snapshot(50.0, 10, Policy::Demand, 7);
        s.members = (0..7)
            .map(|i| member(&format!("m{i}"), MemberState::Expired))
            .collect();
        let (p, _) = newly_expired(&BTreeSet::from(["m0".to_string()]), &s);
        let note = p.unwrap().note;
        assert!(note.starts_with("6 replica(s)"), "{note}");
        assert!(note.ends_with("m1, m2, m3, m4, m5 and 1 more"), "{note}");
    }

    #[test]
    fn notes_fit_the_api_servers_limit_on_a_character_boundary() {
        let long = "é".repeat(MAX_NOTE_BYTES);
        let p = invalid_spec(None, &long).unwrap();
        assert!(p.note.len() <= MAX_NOTE_BYTES);
        assert!(p.note.ends_with("..."));
        assert_eq!(truncate("short".into(), 10), "short");
    }
}

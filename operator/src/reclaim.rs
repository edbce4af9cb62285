//! Instant reclaim on Kubernetes. The coordinator cannot tell a crashed replica from one
//! cut off from it, so a silent member keeps its share for its lease and fallback window
//! (40 s at the defaults). The kubelet can tell: once it reports a replica's container
//! terminated, that process is gone and uses nothing.
//!
//! Its rate share, that is: a request the process sent before it died may still be
//! running at the sink, so its in-flight share stays charged for the ThrottledConsumer's
//! `delivery.timeout` (the longest a sink call runs as a replica counts it), and the
//! fleet's in-flight bound holds across the kill.
//!
//! Each replica names its run in its container's termination message when it starts
//! ([`pacer_budget::protocol::termination_message`]); the kubelet reports that message
//! however the container ended, SIGKILL and OOM kill included. This watch of the fleets'
//! Pods releases the member's lease and fallback as soon as its container is reported
//! terminated (or waiting to restart after it terminated), but only for the run that
//! ended: a restarted container (same pod name, a new run) that already leased keeps its
//! lease ([`pacer_budget::Ledger::release_terminated`]).
//!
//! Not on deletion: a Pod being deleted still runs through its grace period, and a Pod
//! force-deleted on an unreachable node may still be running. No kubelet reports either
//! terminated, so both keep the lease + fallback path.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use pacer_budget::protocol::incarnation_in;
use pacer_budget::service::BudgetId;
use pacer_rules::duration::TIMEOUT;
use tracing::{info, warn};

use crate::build::{CONTAINER, LABEL_CONSUMER};
use crate::crd::ThrottledConsumer;
use crate::reconcile::Context;

/// A replica's run that the kubelet reports terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRun {
    pub budget: BudgetId,
    /// The pod name (`PACER_MEMBER` is the pod name).
    pub member: String,
    pub incarnation: String,
}

/// The run of `pod`'s replica container that has ended, if the kubelet says so. Pure.
///
/// `None` while the container runs, before it ever ran, when its termination message
/// names no run (a replica that could not write it, an image older than this), and for
/// Pods of no fleet.
pub fn ended_run(pod: &Pod) -> Option<EndedRun> {
    let consumer = pod.labels().get(LABEL_CONSUMER)?;
    let status = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?;
    let state = status.state.as_ref()?;
    if state.running.is_some() {
        return None;
    }
    let terminated = match (&state.terminated, &state.waiting) {
        (Some(t), _) => t,
        // Waiting to start again: the last run's end is in lastState.
        (None, Some(_)) => status.last_state.as_ref()?.terminated.as_ref()?,
        (None, None) => return None,
    };
    let incarnation = incarnation_in(terminated.message.as_deref()?)?;
    Some(EndedRun {
        budget: BudgetId::new(pod.namespace()?, consumer.clone()),
        member: pod.name_any(),
        incarnation: incarnation.to_string(),
    })
}

/// Watches the fleets' Pods (in `namespace`, or everywhere) until the task is dropped,
/// releasing the lease of every run reported ended; `consumers` (the controller's cache)
/// gives each fleet's sink call timeout. The watch retries with backoff.
pub async fn watch_pods(
    ctx: Arc<Context>,
    consumers: Store<DeserializeGuard<ThrottledConsumer>>,
    namespace: Option<String>,
) {
    let api: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Only the replicas' Pods (they carry the fleet's label), not every Pod.
    let config = watcher::Config::default().labels(LABEL_CONSUMER);
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                release_ended(&ctx, &consumers, &pod)
            }
            Ok(_) => {}
            Err(e) => warn!(
                error = %e,
                "Pod watch failed; retrying (meanwhile a crashed replica's share returns only after its lease and fallback window)"
            ),
        }
    }
}

fn release_ended(ctx: &Context, consumers: &Store<DeserializeGuard<ThrottledConsumer>>, pod: &Pod) {
    let Some(run) = ended_run(pod) else { return };
    let key = ObjectRef::new(&run.budget.name).within(&run.budget.namespace);
    // Without a valid spec there is no timeout to go by: keep the lease + fallback path.
    let Some(timeout) = consumers
        .get(&key)
        .and_then(|tc| {
            tc.0.as_ref()
                .ok()
                .map(|tc| tc.spec.delivery.timeout.clone())
        })
        .and_then(|t| TIMEOUT.check(&t).ok())
    else {
        return;
    };
    if ctx
        .coordinator
        .release_terminated(&run.budget, &run.member, &run.incarnation, timeout)
    {
        ctx.metrics.reclaims.inc();
        info!(
            budget = %run.budget,
            member = %run.member,
            incarnation = %run.incarnation,
            in_flight_held_for = ?timeout,
            "Replica container terminated; its rate share, lease and fallback are released at once"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "orders-sync-7d9f-x2",
                "namespace": "shop",
                "labels": {LABEL_CONSUMER: "orders-sync"},
            },
            "status": status,
        }))
        .unwrap()
    }

    fn statuses(state: serde_json::Value, last: serde_json::Value) -> serde_json::Value {
        json!({"containerStatuses": [{
            "name": CONTAINER, "image": "pacer", "imageID": "", "ready": false,
            "restartCount": 1, "state": state, "lastState": last,
        }]})
    }

    const MESSAGE: &str = "pacer-incarnation=00ff00ff00ff00ff\n";

    fn ended() -> Option<EndedRun> {
        Some(EndedRun {
            budget: BudgetId::new("shop", "orders-sync"),
            member: "orders-sync-7d9f-x2".into(),
            incarnation: "00ff00ff00ff00ff".into(),
        })
    }

    #[test]
    fn a_terminated_container_names_its_run_budget_and_member() {
        let terminated = json!({"terminated": {"exitCode": 137, "signal": 9, "message": MESSAGE}});
        assert_eq!(
            ended_run(&pod(statuses(terminated.clone(), json!({})))),
            ended()
        );
        // Waiting to restart (CrashLoopBackOff): the last run's end.
        let waiting = json!({"waiting": {"reason": "CrashLoopBackOff"}});
        assert_eq!(
            ended_run(&pod(statuses(waiting, terminated.clone()))),
            ended()
        );
        // Running again: that run is alive, whatever ended before it.
        let running = json!({"running": {"startedAt": "2026-12-02T10:00:00Z"}});
        assert_eq!(ended_run(&pod(statuses(running, terminated))), None);
    }

    #[test]
    fn no_run_is_released_without_a_named_run_a_fleet_or_an_end() {
        let no_message = json!({"terminated": {"exitCode": 1}});
        assert_eq!(ended_run(&pod(statuses(no_message, json!({})))), None);
        let other = json!({"terminated": {"exitCode": 1, "message": "panicked at main.rs"}});
        assert_eq!(ended_run(&pod(statuses(other, json!({})))), None);
        let bad = json!({"terminated": {"exitCode": 1, "message": "pacer-incarnation=../../x"}});
        assert_eq!(ended_run(&pod(statuses(bad, json!({})))), None);
        // Never started.
        let creating = json!({"waiting": {"reason": "ContainerCreating"}});
        assert_eq!(ended_run(&pod(statuses(creating, json!({})))), None);
        // Being deleted but still running (grace period): not ended.
        let running = json!({"running": {"startedAt": "2026-12-02T10:00:00Z"}});
        assert_eq!(ended_run(&pod(statuses(running, json!({})))), None);
        // Another container's end.
        let mut p = pod(statuses(
            json!({"terminated": {"exitCode": 137, "message": MESSAGE}}),
            json!({}),
        ));
        p.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .name = "handler".into();
        assert_eq!(ended_run(&p), None);
        // A Pod of no fleet.
        let mut p = pod(statuses(
            json!({"terminated": {"exitCode": 137, "message": MESSAGE}}),
            json!({}),
        ));
        p.metadata.labels = None;
        assert_eq!(ended_run(&p), None);
    }
}

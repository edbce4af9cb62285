//! Wiring: the ThrottledConsumer watch (through [`DeserializeGuard`], so one malformed
//! object cannot stop the others), the watches of owned children, the reconciler
//! wrapped by [`events::reconcile_and_tell`], readiness, and the sweep that drops
//! budgets of deleted objects from the coordinator.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Controller, Error as ControllerError};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use pacer_budget::service::BudgetId;
use tracing::{debug, info, warn};

use crate::build::FIELD_MANAGER;
use crate::crd::ThrottledConsumer;
use crate::events::{self, Events};
use crate::reconcile::{error_policy, Context};

/// How often budgets of deleted ThrottledConsumers are dropped. A deleted object's pods
/// are being garbage-collected meanwhile, so a few seconds of a stale ledger cost
/// nothing but memory.
pub const GC_INTERVAL: Duration = Duration::from_secs(15);

type Guarded = DeserializeGuard<ThrottledConsumer>;

/// What the controller hands each reconcile: the reconciler's context and the events.
#[derive(Debug)]
struct Wired {
    ctx: Arc<Context>,
    events: Arc<Events>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves. `ready` turns true once the
/// ThrottledConsumer watch has listed everything.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    // Children carry the managed-by label, so the operator caches only its own
    // Deployments, Secrets and PDBs, not every Secret in the cluster.
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let controller = Controller::new(
        api::<Guarded>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .owns(api::<Deployment>(&client, ns), managed.clone())
    .owns(api::<Secret>(&client, ns), managed.clone())
    .owns(api::<PodDisruptionBudget>(&client, ns), managed)
    .graceful_shutdown_on(shutdown);
    let store = controller.store();
    let events = Arc::new(Events::new(client.clone()));
    let sweeper = tokio::spawn(sweep_budgets(store, ctx.clone(), events.clone(), ready));
    info!(namespace = ns.unwrap_or("<all>"), "Controller started");
    controller
        .run(
            |guard, w: Arc<Wired>| {
                events::reconcile_and_tell(guard, w.ctx.clone(), w.events.clone())
            },
            |guard, error, w| error_policy(guard, error, w.ctx.clone()),
            Arc::new(Wired { ctx, events }),
        )
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(object = %obj, "Reconciled"),
                // A failing watch (a missing permission, a CRD that is not installed)
                // keeps the operator from ever seeing objects: say so loudly. The
                // watcher retries with backoff.
                Err(ControllerError::QueueError(e)) => {
                    warn!(error = %e, "Watch failed; retrying")
                }
                // Already logged by error_policy, with its category.
                Err(e) => debug!(error = %e, "Reconcile error"),
            }
        })
        .await;
    sweeper.abort();
    info!("Controller stopped");
}

/// Marks the operator ready once the store is synced, then periodically removes the
/// budgets (and what the events remember) of ThrottledConsumers that are gone.
async fn sweep_budgets(
    store: Store<Guarded>,
    ctx: Arc<Context>,
    events: Arc<Events>,
    ready: Arc<AtomicBool>,
) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    ready.store(true, Ordering::Release);
    info!("ThrottledConsumer watch synced; ready");
    let mut tick = tokio::time::interval(GC_INTERVAL);
    loop {
        tick.tick().await;
        let live: HashSet<BudgetId> = store
            .state()
            .iter()
            .map(|g| {
                BudgetId::new(
                    g.meta().namespace.clone().unwrap_or_default(),
                    g.meta().name.clone().unwrap_or_default(),
                )
            })
            .collect();
        for id in stale_budgets(&ctx.coordinator.ids(), &live) {
            ctx.coordinator.remove(&id);
            ctx.metrics.forget_budget(&id);
            ctx.forget(&id);
            info!(budget = %id, "Budget of a deleted ThrottledConsumer removed");
        }
        events.retain(&live);
        ctx.metrics.budgets.set(ctx.coordinator.ids().len() as i64);
    }
}

/// Budgets registered in the coordinator whose object no longer exists. Pure.
pub fn stale_budgets(registered: &[BudgetId], live: &HashSet<BudgetId>) -> Vec<BudgetId> {
    registered
        .iter()
        .filter(|id| !live.contains(id))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_whose_object_is_gone_are_stale_and_live_ones_are_kept() {
        let a = BudgetId::new("shop", "orders");
        let b = BudgetId::new("shop", "audit");
        let c = BudgetId::new("ops", "orders");
        let live = HashSet::from([a.clone(), c.clone()]);
        assert_eq!(stale_budgets(&[a, b.clone(), c], &live), vec![b]);
    }
}

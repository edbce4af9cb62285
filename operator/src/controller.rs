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
    let reclaimer = tokio::spawn(crate::reclaim::watch_pods(
        ctx.clone(),
        store.clone(),
        namespace.clone(),
    ));
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
    reclaimer.abort();
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
    if !synced(&store).await {
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

/// Resolves `true` once `store` has listed everything (`false`: its writer is gone).
///
/// Not `store.wait_until_ready().await` alone: kube-runtime's readiness is a futures
/// oneshot, which keeps the waker of only the last task that polled it, and the
/// controller's own runner waits on the same store and is polled on every watch event.
/// The sweeper's waker was overwritten and it was never woken: against a real API server
/// the operator never became ready (`/readyz` 503 forever) while reconciling normally.
/// Polling again every 100 ms reads the value once it is there, whoever was woken.
pub async fn synced<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(SYNC_POLL, store.wait_until_ready()).await {
            Ok(result) => return result.is_ok(),
            Err(_elapsed) => continue,
        }
    }
}

/// How often [`synced`] looks at the store again.
const SYNC_POLL: Duration = Duration::from_millis(100);

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

    /// Another waiter polls the store after [`synced`] started waiting, and so holds
    /// the store's only waker slot (the controller's runner does): `synced` still
    /// returns once the store is ready.
    #[tokio::test]
    async fn synced_resolves_after_another_waiter_took_the_wakeup() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::runtime::reflector;
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let ours = tokio::spawn({
            let reader = reader.clone();
            async move { synced(&reader).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut theirs = std::pin::pin!(reader.wait_until_ready());
        assert!(futures::poll!(theirs.as_mut()).is_pending());
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let ours = tokio::time::timeout(Duration::from_secs(2), ours).await;
        assert!(matches!(ours, Ok(Ok(true))), "{ours:?}");
    }

    /// Why [`synced`] exists: with a plain `wait_until_ready`, the waiter that polled
    /// first is never woken. If this starts failing, kube-runtime fixed it and `synced`
    /// can go.
    #[tokio::test]
    async fn a_plain_wait_until_ready_loses_its_wakeup_to_a_later_waiter() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::runtime::reflector;
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let first = tokio::spawn({
            let reader = reader.clone();
            async move { reader.wait_until_ready().await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut later = std::pin::pin!(reader.wait_until_ready());
        assert!(futures::poll!(later.as_mut()).is_pending());
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let first = tokio::time::timeout(Duration::from_millis(500), first).await;
        assert!(
            first.is_err(),
            "the first waiter was woken: kube-runtime no longer loses the wakeup"
        );
    }

    #[test]
    fn budgets_whose_object_is_gone_are_stale_and_live_ones_are_kept() {
        let a = BudgetId::new("shop", "orders");
        let b = BudgetId::new("shop", "audit");
        let c = BudgetId::new("ops", "orders");
        let live = HashSet::from([a.clone(), c.clone()]);
        assert_eq!(stale_budgets(&[a, b.clone(), c], &live), vec![b]);
    }
}

//! The reconciler: one `ThrottledConsumer` at a time, as a list of steps.
//!
//! ```text
//! validate (pure) ──invalid──▶ status only (InvalidSpec), wait for a change
//!     │ valid
//!     ▼
//! token Secret: GET, create once if missing (never applied over, never rotated)
//!     ▼
//! Deployment: build (pure), GET, server-side apply (forced) unless the live object
//!     carries the same applied-hash
//!     ▼
//! PodDisruptionBudget: same, or delete ours when the spec no longer asks for one
//!     ▼
//! coordinator: upsert the budget (capacity, policy, expected members = replicas, token)
//!     ▼
//! status: compute (pure, time passed in), patch only when materially changed
//! ```
//!
//! Deciding lives in `validate`, `build` and `status`; this module only moves data
//! between them, the API server and the embedded coordinator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use pacer_budget::service::{BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Policy, Share};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::build::{self, BuildSettings, FIELD_MANAGER};
use crate::crd::{BudgetPolicy, ThrottledConsumer, ThrottledConsumerStatus};
use crate::metrics::Metrics;
use crate::status::{self, Observed};
use crate::validate::{validate, ValidSpec};

/// How long a ledger entry keeps a member running on its fallback share after its lease
/// expired, in lease lengths: the budget crate's default ratio (30 s for 10 s leases).
pub const FALLBACK_LEASES: u64 = 3;

/// A step of the reconcile that failed. Each names the object and says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ThrottledConsumer {0} has no namespace")]
    MissingNamespace(String),
    #[error("reading Secret {name}: {source}")]
    GetSecret { name: String, source: kube::Error },
    #[error("creating Secret {name}: {source} (check the operator's RBAC for secrets/create)")]
    CreateSecret { name: String, source: kube::Error },
    #[error("reading Deployment {name}: {source}")]
    GetDeployment { name: String, source: kube::Error },
    #[error("applying Deployment {name}: {source}")]
    ApplyDeployment { name: String, source: kube::Error },
    #[error("reading PodDisruptionBudget {name}: {source}")]
    GetPdb { name: String, source: kube::Error },
    #[error("applying PodDisruptionBudget {name}: {source}")]
    ApplyPdb { name: String, source: kube::Error },
    #[error("deleting PodDisruptionBudget {name}: {source}")]
    DeletePdb { name: String, source: kube::Error },
    #[error("patching status of ThrottledConsumer {name}: {source}")]
    PatchStatus { name: String, source: kube::Error },
}

impl Error {
    /// Stable label for the failures metric.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingNamespace(_) => "missing_namespace",
            Error::GetSecret { .. } => "get_secret",
            Error::CreateSecret { .. } => "create_secret",
            Error::GetDeployment { .. } => "get_deployment",
            Error::ApplyDeployment { .. } => "apply_deployment",
            Error::GetPdb { .. } => "get_pdb",
            Error::ApplyPdb { .. } => "apply_pdb",
            Error::DeletePdb { .. } => "delete_pdb",
            Error::PatchStatus { .. } => "patch_status",
        }
    }
}

/// Source of "now" for status times; tests pass a fixed clock.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Everything a reconcile needs besides the object.
pub struct Context {
    pub client: Client,
    /// The embedded coordinator the replicas lease from.
    pub coordinator: Arc<Coordinator>,
    pub metrics: Arc<Metrics>,
    pub settings: BuildSettings,
    pub clock: Clock,
    /// How often a healthy object is reconciled again to refresh its status from the
    /// coordinator (allocations change without any Kubernetes event).
    pub resync: Duration,
    /// Consecutive failures per object, for the error backoff; reset on success.
    failures: Mutex<HashMap<String, u32>>,
    /// Tokens handed to the coordinator, so a deleted Secret is recreated with the same
    /// token instead of locking out running replicas.
    tokens: Mutex<HashMap<BudgetId, String>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        coordinator: Arc<Coordinator>,
        metrics: Arc<Metrics>,
        settings: BuildSettings,
        clock: Clock,
        resync: Duration,
    ) -> Self {
        Self {
            client,
            coordinator,
            metrics,
            settings,
            clock,
            resync,
            failures: Mutex::default(),
            tokens: Mutex::default(),
        }
    }

    /// Drops what is remembered about a deleted object's budget.
    pub fn forget(&self, id: &BudgetId) {
        self.tokens().remove(id);
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<BudgetId, String>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The coordinator's identity of a ThrottledConsumer's budget.
pub fn budget_id(tc: &ThrottledConsumer) -> BudgetId {
    BudgetId::new(tc.namespace().unwrap_or_default(), tc.name_any())
}

/// The coordinator's settings for a validated spec. Pure.
pub fn budget_config(v: &ValidSpec) -> BudgetConfig {
    let b = &v.spec.budget;
    let policy = match b.policy {
        BudgetPolicy::Equal => Policy::Equal,
        BudgetPolicy::Demand => Policy::Demand,
    };
    // Bounds were checked by validate(): all values are positive and small.
    let lease_ms = u64::try_from(b.lease_seconds).unwrap_or(10) * 1000;
    BudgetConfig {
        capacity: Share::new(
            b.messages_per_second,
            u32::try_from(b.max_in_flight).unwrap_or(1),
        ),
        policy,
        expected_members: u32::try_from(v.desired_replicas()).unwrap_or(0),
        lease_ms,
        refresh_ms: u64::try_from(b.refresh_millis).unwrap_or(1000),
        fallback_ms: lease_ms * FALLBACK_LEASES,
    }
}

/// Delay before retrying an object after `failures` consecutive failures: 1 s doubling
/// to 5 min, so a broken API server is not hammered and a blip heals quickly.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Entry point for the controller: unwraps the [`DeserializeGuard`].
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ThrottledConsumer>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = match &guard.0 {
        Ok(tc) => reconcile_one(tc, &ctx).await,
        Err(invalid) => {
            // The API server accepted it, so the CRD in the cluster is older or newer
            // than this operator. Nothing sensible can be written; wait for an edit.
            ctx.metrics.invalid_specs.inc();
            warn!(
                object = %format!(
                    "{}/{}",
                    invalid.metadata.namespace.as_deref().unwrap_or_default(),
                    invalid.metadata.name.as_deref().unwrap_or_default()
                ),
                error = %invalid.error,
                "ThrottledConsumer does not deserialize; is the installed CRD from another operator version?"
            );
            Ok(Action::await_change())
        }
    };
    ctx.metrics.observe_duration(started.elapsed());
    if result.is_ok() {
        ctx.failures().remove(&guard_key(&guard));
    }
    result
}

/// The controller's error policy: count by category, back off per object.
pub fn error_policy(
    guard: Arc<DeserializeGuard<ThrottledConsumer>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&crate::metrics::CategoryLabels {
            category: error.category(),
        })
        .inc();
    let n = {
        let mut f = ctx.failures();
        let n = f.entry(guard_key(&guard)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    warn!(object = %guard_key(&guard), category = error.category(), failures = n, retry_in_s = delay.as_secs(), error = %error, "Reconcile failed");
    Action::requeue(delay)
}

fn guard_key(guard: &DeserializeGuard<ThrottledConsumer>) -> String {
    format!(
        "{}/{}",
        guard.meta().namespace.as_deref().unwrap_or_default(),
        guard.meta().name.as_deref().unwrap_or_default()
    )
}

/// Reconciles one well-formed object.
pub async fn reconcile_one(tc: &ThrottledConsumer, ctx: &Context) -> Result<Action, Error> {
    let ns = tc
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(tc.name_any()))?;
    let id = budget_id(tc);

    // 1. Validate. An invalid spec leaves the children and the budget as they are.
    let valid = match validate(&tc.spec) {
        Ok(v) => v,
        Err(invalid) => {
            ctx.metrics.invalid_specs.inc();
            info!(object = %id, problems = %invalid, "Invalid spec; waiting for a change");
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            let name = build::deployment_name(tc);
            let live = deployments
                .get_opt(&name)
                .await
                .map_err(|source| Error::GetDeployment { name, source })?;
            let snapshot = ctx.coordinator.snapshot(&id);
            let observed = Observed {
                validation: Err(&invalid),
                deployment: live.as_ref(),
                snapshot: snapshot.as_ref(),
            };
            patch_status(tc, ctx, status::compute(tc, observed, (ctx.clock)())).await?;
            return Ok(Action::await_change());
        }
    };

    // 2. The token: created once, read back ever after.
    let token = ensure_token(tc, ctx, &ns, &id).await?;

    // 3. The Deployment.
    let desired = build::deployment(tc, &valid, &ctx.settings);
    let deployment = apply_deployment(ctx, &ns, desired).await?;

    // 4. The PodDisruptionBudget.
    reconcile_pdb(tc, ctx, &ns, build::pod_disruption_budget(tc, &valid)).await?;

    // 5. The budget, live: expected members follow spec.replicas, so a scale-up shrinks
    //    running members before new pods start.
    ctx.coordinator
        .upsert(id.clone(), budget_config(&valid), token);
    let snapshot = ctx.coordinator.snapshot(&id);
    if let Some(s) = &snapshot {
        ctx.metrics.record_budget(&id, s);
    }
    ctx.metrics.budgets.set(ctx.coordinator.ids().len() as i64);

    // 6. Status.
    let observed = Observed {
        validation: Ok(&valid),
        deployment: Some(&deployment),
        snapshot: snapshot.as_ref(),
    };
    patch_status(tc, ctx, status::compute(tc, observed, (ctx.clock)())).await?;
    Ok(Action::requeue(ctx.resync))
}

async fn ensure_token(
    tc: &ThrottledConsumer,
    ctx: &Context,
    ns: &str,
    id: &BudgetId,
) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = build::secret_name(tc);
    let live = secrets
        .get_opt(&name)
        .await
        .map_err(|source| Error::GetSecret {
            name: name.clone(),
            source,
        })?;
    if let Some(token) = live.as_ref().and_then(build::token_from_secret) {
        ctx.tokens().insert(id.clone(), token.clone());
        ctx.metrics.write("secret", "skip");
        return Ok(token);
    }
    // Missing (or emptied): recreate with the token the replicas already hold, if any.
    let token = ctx
        .tokens()
        .get(id)
        .cloned()
        .unwrap_or_else(build::new_token);
    let secret = build::token_secret(tc, &token);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let result = if live.is_some() {
        // Present without a usable token: fill it in (a create would conflict).
        secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
    } else {
        secrets.create(&pp, &secret).await
    };
    match result {
        Ok(_) => {
            info!(object = %id, secret = %name, "Budget token Secret created");
            ctx.metrics.write("secret", "create");
            ctx.tokens().insert(id.clone(), token.clone());
            Ok(token)
        }
        // Lost a race with another writer: use theirs on the next reconcile.
        Err(source) => Err(Error::CreateSecret { name, source }),
    }
}

async fn apply_deployment(
    ctx: &Context,
    ns: &str,
    desired: Deployment,
) -> Result<Deployment, Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let name = desired.metadata.name.clone().unwrap_or_default();
    let live = api
        .get_opt(&name)
        .await
        .map_err(|source| Error::GetDeployment {
            name: name.clone(),
            source,
        })?;
    if let Some(live) = live {
        if build::is_up_to_date(&live.metadata, &desired.metadata) {
            ctx.metrics.write("deployment", "skip");
            return Ok(live);
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(|source| Error::ApplyDeployment {
            name: name.clone(),
            source,
        })?;
    info!(deployment = %format!("{ns}/{name}"), replicas = ?desired.spec.as_ref().and_then(|s| s.replicas), "Deployment applied");
    ctx.metrics.write("deployment", "apply");
    Ok(applied)
}

async fn reconcile_pdb(
    tc: &ThrottledConsumer,
    ctx: &Context,
    ns: &str,
    desired: Option<PodDisruptionBudget>,
) -> Result<(), Error> {
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let name = build::pdb_name(tc);
    let live = api.get_opt(&name).await.map_err(|source| Error::GetPdb {
        name: name.clone(),
        source,
    })?;
    match (desired, live) {
        (None, None) => Ok(()),
        (None, Some(live)) => {
            // Only delete what this object owns; a user's own PDB of the same name stays.
            let ours = live
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == tc.meta().uid.as_ref());
            if ours {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .map_err(|source| Error::DeletePdb {
                        name: name.clone(),
                        source,
                    })?;
                ctx.metrics.write("pdb", "delete");
            }
            Ok(())
        }
        (Some(desired), live) => {
            if live.is_some_and(|l| build::is_up_to_date(&l.metadata, &desired.metadata)) {
                ctx.metrics.write("pdb", "skip");
                return Ok(());
            }
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|source| Error::ApplyPdb { name, source })?;
            ctx.metrics.write("pdb", "apply");
            Ok(())
        }
    }
}

/// Writes `new` unless it is materially equal to the object's current status.
async fn patch_status(
    tc: &ThrottledConsumer,
    ctx: &Context,
    new: ThrottledConsumerStatus,
) -> Result<(), Error> {
    if let Some(old) = &tc.status {
        if status::materially_equal(old, &new) {
            debug!(object = %status::object_ref(tc), "Status unchanged");
            ctx.metrics.write("status", "skip");
            return Ok(());
        }
    }
    let api: Api<ThrottledConsumer> =
        Api::namespaced(ctx.client.clone(), &tc.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": ThrottledConsumer::api_version(&()),
        "kind": ThrottledConsumer::kind(&()),
        "status": new,
    });
    api.patch_status(
        &tc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::PatchStatus {
        name: tc.name_any(),
        source,
    })?;
    ctx.metrics.write("status", "apply");
    Ok(())
}

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
use kube::core::error_boundary::InvalidObject;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use pacer_budget::service::{BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Policy, Share};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::build::{self, BuildSettings, FIELD_MANAGER};
use crate::crd::{ThrottledConsumer, ThrottledConsumerStatus};
use crate::metrics::Metrics;
use crate::status::{self, Observed};
use crate::validate::{validate, ValidSpec};
use pacer_rules::limits::fallback_seconds;

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
    /// Generation of each unparseable object whose status already says so.
    unparseable: Mutex<HashMap<String, Option<i64>>>,
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
            unparseable: Mutex::default(),
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

    fn unparseable(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<i64>>> {
        self.unparseable.lock().unwrap_or_else(|e| e.into_inner())
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
    let policy = Policy::from(b.policy);
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
        fallback_ms: fallback_ms(b),
    }
}

/// `budget.fallbackSeconds` in milliseconds, or its default (validated: 0 to a day).
pub fn fallback_ms(b: &crate::crd::BudgetSpec) -> u64 {
    let lease = i64::from(b.lease_seconds);
    let seconds = b
        .fallback_seconds
        .map_or_else(|| fallback_seconds::default_for(lease), i64::from);
    u64::try_from(seconds).unwrap_or(0) * 1000
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
        Err(invalid) => reconcile_unparseable(invalid, &ctx).await,
    };
    ctx.metrics.observe_duration(started.elapsed());
    if result.is_ok() {
        ctx.failures().remove(&guard_key(&guard));
    }
    result
}

/// An object the API server accepted but this operator cannot parse (a CRD from another
/// operator version, or a `template` that is not a pod template). Says so in the status,
/// once per generation: the status write itself triggers a reconcile, and without the
/// old status to compare with, only the generation tells that nothing changed.
async fn reconcile_unparseable(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.invalid_specs.inc();
    let ns = invalid.metadata.namespace.clone().unwrap_or_default();
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let generation = invalid.metadata.generation;
    if ctx.unparseable().get(&key) == Some(&generation) {
        return Ok(Action::await_change());
    }
    warn!(object = %key, error = %invalid.error, "ThrottledConsumer does not parse; waiting for a change");
    let new = status::unparseable(&name, &invalid.error, generation, (ctx.clock)());
    let api: Api<DeserializeGuard<ThrottledConsumer>> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": ThrottledConsumer::api_version(&()),
        "kind": ThrottledConsumer::kind(&()),
        "status": new,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::PatchStatus {
        name: name.clone(),
        source,
    })?;
    ctx.metrics.write("status", "apply");
    ctx.unparseable().insert(key, generation);
    Ok(Action::await_change())
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
        // Retried with backoff. A 409 means another writer won the create race: the
        // next reconcile's GET reads their token.
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
        if build::deployment_is_up_to_date(&live, &desired) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, converse, tc_from_yaml, Step, Uris, MINIMAL, ORDERS_SYNC};
    use http::{Method, StatusCode};
    use serde_json::Value;

    fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
    }

    fn first_reconcile_steps(u: &Uris, tc: &ThrottledConsumer) -> Vec<Step> {
        vec![
            Step::get_404(u.secret()),
            Step::echo(Method::POST, u.secret_create()),
            Step::get_404(u.deployment()),
            Step::echo(Method::PATCH, u.deployment_apply()),
            Step::get_404(u.pdb()),
            Step::echo(Method::PATCH, u.pdb_apply()),
            Step::status_apply(u.status_apply(), tc),
        ]
    }

    #[tokio::test]
    async fn new_object_gets_a_token_secret_its_children_applied_a_budget_and_a_status() {
        let coord = Coordinator::new();
        let (ctx, api) = fixtures::context(coord.clone());
        let tc = tc_from_yaml(ORDERS_SYNC);
        let u = Uris::of(&tc);

        let (result, seen, _) = converse(
            api,
            first_reconcile_steps(&u, &tc),
            reconcile_one(&tc, &ctx),
        )
        .await;

        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(10)));
        let secret = &seen[1].body;
        assert_eq!(secret["kind"], "Secret");
        assert_eq!(secret["metadata"]["name"], "orders-sync-budget-token");
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["uid"],
            fixtures::UID
        );
        assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
        assert!(secret["data"]["token"].is_string());

        let deployment = &seen[3].body;
        assert_eq!(deployment["apiVersion"], "apps/v1");
        assert_eq!(deployment["kind"], "Deployment");
        assert_eq!(deployment["spec"]["replicas"], 3);
        assert_eq!(
            deployment["metadata"]["ownerReferences"][0]["kind"],
            "ThrottledConsumer"
        );

        let pdb = &seen[5].body;
        assert_eq!(pdb["kind"], "PodDisruptionBudget");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);

        let status_body = &seen[6].body;
        assert_eq!(status_body["apiVersion"], "pacer.dev/v1alpha1");
        assert_eq!(status_body["kind"], "ThrottledConsumer");
        let status = &status_body["status"];
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(
            status["selector"],
            "app.kubernetes.io/name=pacer,pacer.dev/throttled-consumer=orders-sync"
        );
        assert_eq!(condition(status, "InvalidSpec")["status"], "False");
        assert_eq!(condition(status, "Ready")["status"], "False");
        assert_eq!(condition(status, "Ready")["reason"], "ReplicasNotReady");

        let snapshot = coord
            .snapshot(&BudgetId::new("shop", "orders-sync"))
            .unwrap();
        assert_eq!(snapshot.capacity, Share::new(11.0, 5));
        assert_eq!(snapshot.expected_members, 3);
        assert_eq!(snapshot.policy, Policy::Demand);
    }

    #[tokio::test]
    async fn second_reconcile_of_an_unchanged_object_writes_nothing() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let tc = tc_from_yaml(ORDERS_SYNC);
        let u = Uris::of(&tc);
        let (first, seen, api) = converse(
            api,
            first_reconcile_steps(&u, &tc),
            reconcile_one(&tc, &ctx),
        )
        .await;
        first.unwrap();

        // The object as the API server now returns it, and its children as applied.
        let mut again = tc.clone();
        again.status = Some(serde_json::from_value(seen[6].body["status"].clone()).unwrap());
        let steps = vec![
            Step::get(u.secret(), seen[1].body.clone()),
            Step::get(u.deployment(), seen[3].body.clone()),
            Step::get(u.pdb(), seen[5].body.clone()),
        ];
        let (second, reads, _) = converse(api, steps, reconcile_one(&again, &ctx)).await;

        assert_eq!(second.unwrap(), Action::requeue(Duration::from_secs(10)));
        assert!(reads.iter().all(|r| r.method == Method::GET));
    }

    #[tokio::test]
    async fn invalid_spec_writes_only_the_status_naming_the_field_and_waits_for_a_change() {
        let coord = Coordinator::new();
        let (ctx, api) = fixtures::context(coord.clone());
        let mut tc = tc_from_yaml(ORDERS_SYNC);
        tc.spec.budget.max_in_flight = 0;
        let u = Uris::of(&tc);
        let running = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "orders-sync", "namespace": "shop"},
            "spec": {"selector": {}, "template": {}},
            "status": {"replicas": 3, "readyReplicas": 3}
        });
        let steps = vec![
            Step::get(u.deployment(), running),
            Step::status_apply(u.status_apply(), &tc),
        ];

        let (result, seen, _) = converse(api, steps, reconcile_one(&tc, &ctx)).await;

        assert_eq!(result.unwrap(), Action::await_change());
        let status = &seen[1].body["status"];
        let invalid = condition(status, "InvalidSpec");
        assert_eq!(invalid["status"], "True");
        assert_eq!(
            invalid["message"],
            "spec.budget.maxInFlight: 0 is out of range, must be 1 to 100000"
        );
        assert_eq!(condition(status, "Ready")["reason"], "InvalidSpec");
        assert_eq!(status["readyReplicas"], 3);
        assert!(
            coord.ids().is_empty(),
            "no budget registered for an invalid spec"
        );
    }

    #[tokio::test]
    async fn invalid_spec_whose_status_already_says_so_writes_nothing() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let mut tc = tc_from_yaml(MINIMAL);
        tc.spec.sink.http = Some(crate::crd::HttpSink {
            url: "http://handler:8080/".into(),
        });
        let u = Uris::of(&tc);
        let steps = vec![
            Step::get_404(u.deployment()),
            Step::status_apply(u.status_apply(), &tc),
        ];
        let (_, seen, api) = converse(api, steps, reconcile_one(&tc, &ctx)).await;
        tc.status = Some(serde_json::from_value(seen[1].body["status"].clone()).unwrap());

        let (result, _, _) = converse(
            api,
            vec![Step::get_404(u.deployment())],
            reconcile_one(&tc, &ctx),
        )
        .await;

        assert_eq!(result.unwrap(), Action::await_change());
    }

    #[tokio::test]
    async fn deleted_token_secret_is_recreated_with_the_token_replicas_already_hold() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let tc = tc_from_yaml(MINIMAL);
        let u = Uris::of(&tc);
        let steps = |u: &Uris, tc: &ThrottledConsumer| {
            vec![
                Step::get_404(u.secret()),
                Step::echo(Method::POST, u.secret_create()),
                Step::get_404(u.deployment()),
                Step::echo(Method::PATCH, u.deployment_apply()),
                Step::get_404(u.pdb()),
                Step::status_apply(u.status_apply(), tc),
            ]
        };
        let (_, first, api) = converse(api, steps(&u, &tc), reconcile_one(&tc, &ctx)).await;
        let (_, second, _) = converse(api, steps(&u, &tc), reconcile_one(&tc, &ctx)).await;

        assert_eq!(
            first[1].body["data"]["token"],
            second[1].body["data"]["token"]
        );
    }

    #[tokio::test]
    async fn failed_apply_is_an_error_with_its_category_and_backs_off() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let tc = tc_from_yaml(MINIMAL);
        let u = Uris::of(&tc);
        let boom = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
        let steps = vec![
            Step::get_404(u.secret()),
            Step::echo(Method::POST, u.secret_create()),
            Step::get_404(u.deployment()),
            Step::new(
                Method::PATCH,
                u.deployment_apply(),
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(boom),
            ),
        ];

        let (result, _, _) = converse(api, steps, reconcile_one(&tc, &ctx)).await;

        let err = result.unwrap_err();
        assert_eq!(err.category(), "apply_deployment");
        assert!(
            err.to_string()
                .starts_with("applying Deployment audit-export: "),
            "{err}"
        );
        let guard = Arc::new(DeserializeGuard(Ok(tc)));
        assert_eq!(
            error_policy(guard.clone(), &err, ctx.clone()),
            Action::requeue(Duration::from_secs(1))
        );
        assert_eq!(
            error_policy(guard, &err, ctx.clone()),
            Action::requeue(Duration::from_secs(2))
        );
        assert!(ctx
            .metrics
            .encode()
            .contains(r#"pacer_operator_reconcile_failures_total{category="apply_deployment"} 2"#));
    }

    #[tokio::test]
    async fn malformed_object_gets_an_invalid_spec_status_once_per_generation() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let mut raw: Value = serde_yaml::from_str(MINIMAL).unwrap();
        raw["metadata"]["namespace"] = "default".into();
        raw["metadata"]["generation"] = 4.into();
        raw["spec"]["budget"]["policy"] = "fair".into();
        let guard: DeserializeGuard<ThrottledConsumer> =
            serde_json::from_value(raw.clone()).unwrap();
        assert!(guard.0.is_err());
        let guard = Arc::new(guard);
        let uri = "/apis/pacer.dev/v1alpha1/namespaces/default/throttledconsumers/audit-export/status?&force=true&fieldManager=pacer-operator";
        let steps = vec![Step::new(Method::PATCH, uri, StatusCode::OK, Some(raw))];

        let (result, seen, api) = converse(api, steps, reconcile(guard.clone(), ctx.clone())).await;

        assert_eq!(result.unwrap(), Action::await_change());
        let status = &seen[0].body["status"];
        assert_eq!(status["observedGeneration"], 4);
        let invalid = condition(status, "InvalidSpec");
        assert_eq!(invalid["status"], "True");
        assert_eq!(
            invalid["message"],
            "the object does not parse as a ThrottledConsumer: Unknown variant fair. Expected one of equal, demand"
        );
        assert_eq!(condition(status, "Ready")["reason"], "InvalidSpec");

        // The status write comes back as a watch event: nothing more to say.
        let (again, seen, _) = converse(api, vec![], reconcile(guard, ctx)).await;
        assert_eq!(again.unwrap(), Action::await_change());
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn removing_the_pdb_from_the_spec_deletes_the_operators_pdb() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let tc = tc_from_yaml(ORDERS_SYNC);
        let u = Uris::of(&tc);
        let (_, seen, api) = converse(
            api,
            first_reconcile_steps(&u, &tc),
            reconcile_one(&tc, &ctx),
        )
        .await;
        let mut without = tc.clone();
        without.spec.pod_disruption_budget = None;
        let steps = vec![
            Step::get(u.secret(), seen[1].body.clone()),
            Step::get(u.deployment(), seen[3].body.clone()),
            Step::get(u.pdb(), seen[5].body.clone()),
            Step::new(
                Method::DELETE,
                format!("{}?", u.pdb()),
                StatusCode::OK,
                Some(seen[5].body.clone()),
            ),
            Step::status_apply(u.status_apply(), &without),
        ];

        let (result, _, _) = converse(api, steps, reconcile_one(&without, &ctx)).await;

        result.unwrap();
    }

    #[tokio::test]
    async fn budget_edit_reaches_the_coordinator_without_restarting_the_pods() {
        let coord = Coordinator::new();
        let (ctx, api) = fixtures::context(coord.clone());
        let tc = tc_from_yaml(ORDERS_SYNC);
        let u = Uris::of(&tc);
        let (_, seen, api) = converse(
            api,
            first_reconcile_steps(&u, &tc),
            reconcile_one(&tc, &ctx),
        )
        .await;
        let mut edited = tc.clone();
        edited.spec.budget.messages_per_second = 20.0;
        edited.spec.budget.max_in_flight = 8;
        edited.metadata.generation = Some(2);
        edited.status = Some(serde_json::from_value(seen[6].body["status"].clone()).unwrap());
        let steps = vec![
            Step::get(u.secret(), seen[1].body.clone()),
            Step::get(u.deployment(), seen[3].body.clone()),
            Step::get(u.pdb(), seen[5].body.clone()),
            Step::status_apply(u.status_apply(), &edited),
        ];

        let (result, seen, _) = converse(api, steps, reconcile_one(&edited, &ctx)).await;

        result.unwrap();
        assert_eq!(seen[3].body["status"]["observedGeneration"], 2);
        let snapshot = coord
            .snapshot(&BudgetId::new("shop", "orders-sync"))
            .unwrap();
        assert_eq!(snapshot.capacity, Share::new(20.0, 8));
    }

    #[tokio::test]
    async fn deployment_scaled_by_hand_is_scaled_back_to_spec_replicas() {
        let (ctx, api) = fixtures::context(Coordinator::new());
        let tc = tc_from_yaml(ORDERS_SYNC);
        let u = Uris::of(&tc);
        let (_, seen, api) = converse(
            api,
            first_reconcile_steps(&u, &tc),
            reconcile_one(&tc, &ctx),
        )
        .await;
        let mut again = tc.clone();
        again.status = Some(serde_json::from_value(seen[6].body["status"].clone()).unwrap());
        let mut scaled_by_hand = seen[3].body.clone();
        scaled_by_hand["spec"]["replicas"] = 7.into();
        let steps = vec![
            Step::get(u.secret(), seen[1].body.clone()),
            Step::get(u.deployment(), scaled_by_hand),
            Step::echo(Method::PATCH, u.deployment_apply()),
            Step::get(u.pdb(), seen[5].body.clone()),
        ];

        let (result, seen, _) = converse(api, steps, reconcile_one(&again, &ctx)).await;

        result.unwrap();
        assert_eq!(seen[2].body["spec"]["replicas"], 3);
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(
            delays,
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
        );
    }

    #[test]
    fn budget_config_follows_the_spec_and_paused_expects_no_members() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let v = validate(&tc.spec).unwrap();
        let c = budget_config(&v);
        assert_eq!(c.capacity, Share::new(11.0, 5));
        assert_eq!(
            (c.expected_members, c.lease_ms, c.refresh_ms, c.fallback_ms),
            (3, 10_000, 1_000, 30_000)
        );
        let mut paused = tc.spec.clone();
        paused.paused = true;
        assert_eq!(
            budget_config(&validate(&paused).unwrap()).expected_members,
            0
        );
    }

    #[test]
    fn fallback_seconds_sets_the_fallback_window_and_defaults_to_three_leases() {
        let tc = tc_from_yaml(ORDERS_SYNC);
        let mut spec = tc.spec.clone();
        assert_eq!(
            spec.budget.fallback_seconds,
            Some(30),
            "the example sets it"
        );
        assert_eq!(budget_config(&validate(&spec).unwrap()).fallback_ms, 30_000);
        spec.budget.fallback_seconds = None;
        spec.budget.lease_seconds = 4;
        assert_eq!(budget_config(&validate(&spec).unwrap()).fallback_ms, 12_000);
        spec.budget.fallback_seconds = Some(0);
        assert_eq!(budget_config(&validate(&spec).unwrap()).fallback_ms, 0);
        spec.budget.fallback_seconds = Some(90);
        assert_eq!(budget_config(&validate(&spec).unwrap()).fallback_ms, 90_000);
        spec.budget.fallback_seconds = Some(-1);
        let refused = validate(&spec).unwrap_err().to_string();
        assert!(
            refused.contains("spec.budget.fallbackSeconds: -1 is out of range, must be 0 to 86400"),
            "{refused}"
        );
    }
}

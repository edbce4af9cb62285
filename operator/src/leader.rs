//! Leader election with a `coordination.k8s.io/v1` Lease, so the operator can run with a
//! hot standby: only the leader reconciles and serves the lease protocol.
//!
//! # The safety argument
//!
//! A standby takes the Lease only once the record has not changed for the Lease's
//! duration *as measured on its own clock since it last saw it change* (client-go's
//! rule: no comparison of timestamps written by another machine, so clock skew does not
//! matter, only clock rate). The leader stops granting leases and reconciling as soon as
//! it has gone [`Timing::renew_deadline`] without a successful renewal, and
//! `renew_deadline < lease` ([`Timing::validate`]). The last renewal the standby saw is
//! no later than the leader's last successful one, so the old leader has stopped before
//! the standby can take over. Even so, the new leader starts its coordinator afresh, in
//! learning mode (`pacer_budget::Ledger::restarted`): replicas keep using what the old
//! leader granted until they report it, so a failover can never push a fleet over its
//! budget.
//!
//! A leader that loses the Lease exits (the kubelet restarts it as a standby) rather
//! than trying to demote itself in place: its coordinator state must not outlive its
//! leadership. On a clean shutdown (SIGTERM) it releases the Lease (empty holder), so the
//! standby takes over at its next attempt instead of waiting out the duration.
//!
//! # Why not a crate
//!
//! `kube-leader-election` and `kube-lease-manager` both exist and either could drive this.
//! Written here (a few API calls) because the argument above needs its three parts in
//! one place, each tested: expiry judged on the local clock from the last observed
//! change, a hard renew deadline that stops granting, release on shutdown.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::Utc;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{info, warn};

/// The Lease's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a record must stay unchanged before a standby takes the Lease.
    pub lease: Duration,
    /// How long the leader goes on without a successful renewal before it stops.
    pub renew_deadline: Duration,
    /// Pause between attempts (renewals, and a standby's checks).
    pub retry: Duration,
}

impl Timing {
    /// client-go's defaults: a failover within 15 s of a leader's death.
    pub const DEFAULT: Timing = Timing {
        lease: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };

    /// `retry < renew_deadline < lease`: the leader gets several attempts, and stops
    /// before anyone may take over.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry.is_zero() || self.retry >= self.renew_deadline {
            return Err(format!(
                "retry period {:?} must be above zero and below the renew deadline {:?}",
                self.retry, self.renew_deadline
            ));
        }
        if self.renew_deadline >= self.lease {
            return Err(format!(
                "renew deadline {:?} must be below the lease duration {:?}, so a leader stops before a standby may take over",
                self.renew_deadline, self.lease
            ));
        }
        Ok(())
    }
}

/// What a candidate does next, given the record it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it, holding it.
    Create,
    /// Free (released, or unchanged for its whole duration): take it.
    Take,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it.
    Wait,
}

/// The next step for `me`, given the Lease's spec and how long the record has gone
/// unchanged as this process observed it. Pure.
pub fn step(spec: Option<&LeaseSpec>, unchanged_for: Duration, me: &str, lease: Duration) -> Step {
    let Some(spec) = spec else {
        return Step::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Step::Renew,
        None | Some("") => Step::Take,
        Some(_) => {
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(lease, Duration::from_secs);
            if unchanged_for >= theirs {
                Step::Take
            } else {
                Step::Wait
            }
        }
    }
}

/// The part of a record whose change shows its holder is alive: holder and renew time.
type Fingerprint = (Option<String>, Option<MicroTime>);

fn fingerprint(lease: &Lease) -> Option<Fingerprint> {
    let spec = lease.spec.as_ref()?;
    Some((spec.holder_identity.clone(), spec.renew_time.clone()))
}

/// One process's view of the election.
#[derive(Debug)]
pub struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record last read and when it last changed, on this process's clock.
    seen: Option<(Option<Fingerprint>, Instant)>,
}

/// Why leadership ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// No successful renewal within the renew deadline.
    Lost,
}

impl Election {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Election {
        Election {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            seen: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&mut self) {
        let mut waiting_logged = false;
        loop {
            match self.attempt().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "Became the leader");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    info!(lease = %self.name, identity = %self.identity, "Standing by: another operator leads");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(lease = %self.name, error = %e, "Leader election: reading or writing the Lease failed; retrying")
                }
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the Lease every retry period; returns once no renewal succeeded within the
    /// renew deadline (a renewal still pending then is abandoned).
    pub async fn keep(&mut self) -> Ended {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let deadline = renewed + self.timing.renew_deadline;
            match tokio::time::timeout_at(deadline, self.attempt()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "Leader election: the Lease was taken by another operator");
                    return Ended::Lost;
                }
                Ok(Err(e)) => {
                    warn!(lease = %self.name, error = %e, "Leader election: renewing the Lease failed")
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Ended::Lost;
            }
        }
    }

    /// Gives the Lease up (clean shutdown), if still ours, so a standby takes it at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Utc::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.name, "Released the leader Lease"),
            Err(e) => {
                warn!(lease = %self.name, error = %e, "Releasing the leader Lease failed; a standby takes it once it expires")
            }
        }
    }

    /// Reads the Lease and creates, takes or renews it if it may. `Ok(true)`: this
    /// process holds it now.
    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let now = Instant::now();
        let print = current.as_ref().and_then(fingerprint);
        let changed_at = match &self.seen {
            Some((before, at)) if *before == print => *at,
            _ => now,
        };
        self.seen = Some((print, changed_at));
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let wall = MicroTime(Utc::now());
        let duration = i32::try_from(self.timing.lease.as_secs()).unwrap_or(i32::MAX);
        let write = match step(spec, now - changed_at, &self.identity, self.timing.lease) {
            Step::Wait => return Ok(false),
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(wall.clone()),
                        renew_time: Some(wall),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            step @ (Step::Take | Step::Renew) => {
                // `current` carries its resourceVersion: a concurrent writer wins, we
                // get 409 and look again next time.
                let mut lease = current.expect("a Lease to take or renew");
                let spec = lease.spec.get_or_insert_with(Default::default);
                if step == Step::Take {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(wall.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(wall);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match write {
            Ok(written) => {
                self.seen = Some((fingerprint(&written), Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The coordinator's port: its routes while this process leads; before, and once it has
/// stopped leading, every request gets 503 with `Retry-After: 1` (the replicas retry;
/// the Service sends them to the Ready leader anyway).
#[derive(Clone, Default)]
pub struct Gate(Arc<RwLock<Option<Router>>>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.0.read().is_ok_and(|g| g.is_some());
        f.debug_struct("Gate").field("open", &open).finish()
    }
}

impl Gate {
    /// The router to serve: it forwards to whatever [`Gate::open`] set.
    pub fn router(&self) -> Router {
        let gate = self.clone();
        Router::new().fallback_service(tower::service_fn(move |req: Request| {
            let inner = gate.0.read().unwrap_or_else(|e| e.into_inner()).clone();
            async move {
                Ok::<Response, Infallible>(match inner {
                    Some(router) => router.oneshot(req).await.into_response(),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        Json(serde_json::json!({
                            "error": "this operator is a standby: lease requests go to the leader"
                        })),
                    )
                        .into_response(),
                })
            }
        }))
    }

    pub fn open(&self, routes: Router) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(routes);
    }

    pub fn close(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_gate_answers_503_with_retry_after_and_an_open_one_forwards() {
        let gate = Gate::default();
        let app = gate.router();
        let get = |app: Router| async move {
            let req = Request::builder()
                .uri("/livez")
                .body(axum::body::Body::empty())
                .unwrap();
            app.oneshot(req).await.unwrap()
        };
        let r = get(app.clone()).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        gate.open(Router::new().route("/livez", axum::routing::get(|| async { "ok" })));
        assert_eq!(get(app.clone()).await.status(), StatusCode::OK);
        gate.close();
        assert_eq!(get(app).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
    }

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_candidate_takes_a_lease_only_when_free_or_unchanged_for_its_duration() {
        let s = Duration::from_secs;
        assert_eq!(step(None, s(0), "a", LEASE), Step::Create);
        let theirs = held_by(Some("b"), Some(15));
        assert_eq!(step(Some(&theirs), s(14), "a", LEASE), Step::Wait);
        assert_eq!(step(Some(&theirs), s(15), "a", LEASE), Step::Take);
        // Their record's duration, not ours, decides.
        let long = held_by(Some("b"), Some(60));
        assert_eq!(step(Some(&long), s(30), "a", LEASE), Step::Wait);
        // Without one, ours.
        let unspecified = held_by(Some("b"), None);
        assert_eq!(step(Some(&unspecified), s(15), "a", LEASE), Step::Take);
        // Released (empty or no holder): at once.
        assert_eq!(
            step(Some(&held_by(Some(""), Some(1))), s(0), "a", LEASE),
            Step::Take
        );
        assert_eq!(
            step(Some(&held_by(None, Some(1))), s(0), "a", LEASE),
            Step::Take
        );
        // Ours: renew, however old.
        let ours = held_by(Some("a"), Some(15));
        assert_eq!(step(Some(&ours), s(100), "a", LEASE), Step::Renew);
    }

    #[test]
    fn the_leader_stops_before_anyone_may_take_over() {
        assert!(Timing::DEFAULT.validate().is_ok());
        let late = Timing {
            renew_deadline: Duration::from_secs(15),
            ..Timing::DEFAULT
        };
        assert!(late
            .validate()
            .unwrap_err()
            .contains("below the lease duration"));
        let busy = Timing {
            retry: Duration::from_secs(10),
            ..Timing::DEFAULT
        };
        assert!(busy
            .validate()
            .unwrap_err()
            .contains("below the renew deadline"));
    }
}

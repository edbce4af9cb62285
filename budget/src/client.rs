//! The replica side of the lease protocol.
//!
//! [`spawn`] runs a refresh loop that renews the lease every `refreshMs` (with ±10 %
//! jitter so a fleet started together does not refresh in lock-step), reports what it
//! is holding, and publishes the share the replica may use on a watch channel:
//!
//! ```text
//!   no grant yet ──grant──▶ Granted ──lease expires──▶ Fallback ──fallbackMs──▶ None (0)
//!                              ▲                          │
//!                              └──────── grant ───────────┘
//! ```
//!
//! The lease is counted from when the request was *sent*, so the client's view expires
//! no later than the coordinator's. When a grant is smaller than what the replica was
//! holding, the client refreshes once more at once: that request shows the coordinator
//! the smaller holding, which frees the difference for other members (a scale event
//! converges in two refresh intervals instead of three). A grant short of the member's
//! target comes with a shorter `refreshMs` (see `Ledger::refresh_for`), which this loop
//! follows like any other. Failed requests are retried
//! with capped exponential backoff; 401 and 404 are retried too, since the operator may
//! create the budget or its token after the pod starts.

use crate::protocol::{Grant, LeaseRequest, Share};
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where the coordinator is and who this replica is.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `http://host:port` of the coordinator.
    pub base_url: String,
    pub namespace: String,
    pub name: String,
    pub token: String,
    pub member: String,
}

/// Without the token: a logged config must not leak the budget's credential.
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("member", &self.member)
            .finish()
    }
}

/// This process's run, sent with every lease request (see
/// [`LeaseRequest::incarnation`]): 16 random hexadecimal digits, the same for every
/// client in the process (they are different members, and a process is one run).
pub fn incarnation() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

/// What the replica reports each refresh.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Demand {
    pub demand: Share,
    pub observed_rate: Option<f64>,
}

/// Where the current share comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOrigin {
    /// No usable lease: run at zero.
    None,
    Granted,
    /// The lease expired without renewal; running at the fallback share.
    Fallback,
}

/// The share the replica may use now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    pub share: Share,
    pub origin: LeaseOrigin,
    pub epoch: u64,
}

impl Lease {
    pub const NONE: Lease = Lease {
        share: Share::ZERO,
        origin: LeaseOrigin::None,
        epoch: 0,
    };
}

/// The client's lease state machine (pure: time passed in).
#[derive(Debug, Clone, Default)]
pub struct LeaseState {
    held: Option<Held>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    grant: Grant,
    lease_until: Instant,
    fallback_until: Instant,
}

impl LeaseState {
    /// Applies a grant answering a request sent at `sent_at`.
    pub fn apply(&mut self, grant: Grant, sent_at: Instant) {
        let lease_until = sent_at + Duration::from_millis(grant.lease_ms);
        self.held = Some(Held {
            grant,
            lease_until,
            fallback_until: lease_until + Duration::from_millis(grant.fallback_ms),
        });
    }

    /// Gives everything up (after a release).
    pub fn clear(&mut self) {
        self.held = None;
    }

    /// What may be used at `now`.
    pub fn effective(&self, now: Instant) -> Lease {
        match &self.held {
            Some(h) if now < h.lease_until => Lease {
                share: h.grant.share(),
                origin: LeaseOrigin::Granted,
                epoch: h.grant.epoch,
            },
            Some(h) if now < h.fallback_until => Lease {
                share: h.grant.fallback,
                origin: LeaseOrigin::Fallback,
                epoch: h.grant.epoch,
            },
            _ => Lease::NONE,
        }
    }

    /// The fallback share behind what is used at `now` (reported with the holding so
    /// the coordinator knows what this replica would fall to).
    pub fn holding_fallback(&self, now: Instant) -> Share {
        match &self.held {
            Some(h) => h.grant.fallback.min(self.effective(now).share),
            None => Share::ZERO,
        }
    }

    /// The fallback window of the grant held (reported so the coordinator charges a
    /// silent replica for as long as it may really run on its fallback).
    pub fn holding_fallback_ms(&self) -> Option<u64> {
        self.held.as_ref().map(|h| h.grant.fallback_ms)
    }

    /// The next instant at which [`Self::effective`] changes on its own.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let h = self.held.as_ref()?;
        [h.lease_until, h.fallback_until]
            .into_iter()
            .find(|t| *t > now)
    }
}

/// Counters for the replica's metrics.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub refresh_ok: AtomicU64,
    pub refresh_error: AtomicU64,
}

/// The running refresh loop.
#[derive(Debug)]
pub struct LeaseHandle {
    lease: watch::Receiver<Lease>,
    stats: Arc<ClientStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl LeaseHandle {
    /// The share the replica may use, updated on every grant, expiry and release.
    pub fn lease(&self) -> watch::Receiver<Lease> {
        self.lease.clone()
    }

    pub fn stats(&self) -> Arc<ClientStats> {
        self.stats.clone()
    }

    /// Stops refreshing and releases the lease (clean shutdown: the share returns to
    /// the fleet at once). The published lease drops to zero first.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Stops without releasing (as a crash would; the lease runs out on its own).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Backoff bounds for failed refreshes.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Refresh interval before the first grant says otherwise.
const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

/// Starts the refresh loop on the current tokio runtime.
pub fn spawn(config: ClientConfig, demand: watch::Receiver<Demand>) -> LeaseHandle {
    let (lease_tx, lease_rx) = watch::channel(Lease::NONE);
    let (stop_tx, stop_rx) = oneshot::channel();
    let stats = Arc::new(ClientStats::default());
    let task = tokio::spawn(refresh_loop(
        config,
        demand,
        lease_tx,
        stop_rx,
        stats.clone(),
    ));
    LeaseHandle {
        lease: lease_rx,
        stats,
        stop: Some(stop_tx),
        task,
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

#[derive(Debug, thiserror::Error)]
enum RefreshError {
    #[error("coordinator unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("coordinator answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("coordinator did not answer within {0:?}")]
    Timeout(Duration),
}

/// `GET /v1/budgets/{namespace}/{name}`: the budget as the coordinator at `base_url`
/// sees it, `None` if it does not answer with one within 2 s. For tools and tests that
/// watch a fleet (`pacer demo`, the fleet harness).
pub async fn snapshot(
    base_url: &str,
    namespace: &str,
    name: &str,
    token: &str,
) -> Option<crate::Snapshot> {
    reqwest::Client::new()
        .get(format!(
            "{}/v1/budgets/{namespace}/{name}",
            base_url.trim_end_matches('/')
        ))
        .bearer_auth(token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()
}

async fn refresh_loop(
    config: ClientConfig,
    demand: watch::Receiver<Demand>,
    lease_tx: watch::Sender<Lease>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<ClientStats>,
) {
    let http = reqwest::Client::new();
    let base = config.base_url.trim_end_matches('/');
    let leases_url = format!(
        "{base}/v1/budgets/{}/{}/leases",
        config.namespace, config.name
    );
    let mut state = LeaseState::default();
    let mut refresh_every = DEFAULT_REFRESH;
    let mut backoff = MIN_BACKOFF;
    let mut next_refresh = Instant::now();
    let mut acked_shrink = false;
    let mut failures: u64 = 0;

    loop {
        let now = Instant::now();
        publish(&lease_tx, state.effective(now));
        let wake = state
            .next_change(now)
            .map_or(next_refresh, |t| t.min(next_refresh));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = &mut stop => break,
        }
        let now = Instant::now();
        if now < next_refresh {
            continue; // only the lease changed state (expiry or end of fallback)
        }
        let holding = state.effective(now).share;
        let d = *demand.borrow();
        let req = LeaseRequest {
            member: config.member.clone(),
            demand: d.demand,
            holding: Some(holding),
            holding_fallback: Some(state.holding_fallback(now)),
            holding_fallback_ms: state.holding_fallback_ms(),
            incarnation: Some(incarnation().to_string()),
            observed_rate: d.observed_rate,
        };
        let timeout = refresh_every.clamp(Duration::from_millis(500), Duration::from_secs(5));
        let sent_at = Instant::now();
        let result = tokio::select! {
            r = send(&http, &leases_url, &config.token, &req, timeout) => r,
            _ = &mut stop => break,
        };
        let now = Instant::now();
        match result {
            Ok(grant) => {
                stats.refresh_ok.fetch_add(1, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(failures, "Coordinator reachable again");
                }
                failures = 0;
                backoff = MIN_BACKOFF;
                refresh_every = Duration::from_millis(grant.refresh_ms.max(1));
                state.apply(grant, sent_at);
                let shrank = grant.rate < holding.rate || grant.in_flight < holding.in_flight;
                next_refresh = if shrank && !acked_shrink {
                    acked_shrink = true;
                    now
                } else {
                    acked_shrink = false;
                    now + jitter(refresh_every)
                };
                tracing::debug!(
                    rate = grant.rate,
                    in_flight = grant.in_flight,
                    epoch = grant.epoch,
                    "Lease renewed"
                );
            }
            Err(e) => {
                stats.refresh_error.fetch_add(1, Ordering::Relaxed);
                failures += 1;
                // One warning per outage and a reminder every 30 failures keep logs
                // readable during a long coordinator outage.
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, failures, "Lease refresh failed");
                } else {
                    tracing::debug!(error = %e, failures, "Lease refresh failed");
                }
                next_refresh = now + jitter(backoff);
                backoff = (backoff * 2)
                    .min(MAX_BACKOFF)
                    .min(refresh_every.max(MIN_BACKOFF));
            }
        }
    }

    // Clean shutdown: stop using the lease first, then tell the coordinator.
    state.clear();
    publish(&lease_tx, Lease::NONE);
    let url = format!(
        "{leases_url}/{}?incarnation={}",
        config.member,
        incarnation()
    );
    match tokio::time::timeout(
        Duration::from_secs(2),
        http.delete(&url).bearer_auth(&config.token).send(),
    )
    .await
    {
        Ok(Ok(r)) if r.status().is_success() => tracing::info!("Lease released"),
        Ok(Ok(r)) => tracing::warn!(
            status = r.status().as_u16(),
            "Lease release refused; it will expire"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "Lease release failed; it will expire"),
        Err(_) => tracing::warn!("Lease release timed out; it will expire"),
    }
}

fn publish(tx: &watch::Sender<Lease>, lease: Lease) {
    tx.send_if_modified(|cur| {
        if *cur != lease {
            *cur = lease;
            true
        } else {
            false
        }
    });
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    req: &LeaseRequest,
    timeout: Duration,
) -> Result<Grant, RefreshError> {
    let call = async {
        let resp = http.post(url).bearer_auth(token).json(req).send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(RefreshError::Status {
                status: status.as_u16(),
                body: body.chars().take(512).collect(),
            });
        }
        Ok(resp.json::<Grant>().await?)
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| RefreshError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(rate: f64, fallback: f64) -> Grant {
        Grant {
            rate,
            in_flight: 4,
            lease_ms: 1_000,
            refresh_ms: 100,
            fallback: Share::new(fallback, 1),
            fallback_ms: 3_000,
            epoch: 1,
        }
    }

    #[test]
    fn lease_falls_back_after_expiry_then_stops_after_the_fallback_window() {
        let t0 = Instant::now();
        let mut s = LeaseState::default();
        assert_eq!(s.effective(t0), Lease::NONE);
        s.apply(grant(10.0, 2.0), t0);
        assert_eq!(s.effective(t0).share, Share::new(10.0, 4));
        assert_eq!(s.next_change(t0), Some(t0 + Duration::from_millis(1_000)));
        let t1 = t0 + Duration::from_millis(1_000);
        assert_eq!(s.effective(t1).origin, LeaseOrigin::Fallback);
        assert_eq!(s.effective(t1).share, Share::new(2.0, 1));
        let t2 = t0 + Duration::from_millis(4_000);
        assert_eq!(s.effective(t2), Lease::NONE);
        assert_eq!(s.next_change(t2), None);
    }

    #[test]
    fn lease_is_counted_from_when_the_request_was_sent() {
        let sent = Instant::now();
        let mut s = LeaseState::default();
        s.apply(grant(5.0, 1.0), sent);
        let just_before = sent + Duration::from_millis(999);
        assert_eq!(s.effective(just_before).origin, LeaseOrigin::Granted);
    }
}

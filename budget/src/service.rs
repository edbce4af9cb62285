//! The coordinator: many budgets' ledgers behind the lease protocol over HTTP.
//!
//! This module only moves data between HTTP and [`Ledger`]s; every decision is in the
//! ledger. Time is milliseconds since the coordinator was created: a ledger created in
//! the first lease-plus-fallback window after start may face leases granted by a
//! previous incarnation, so it starts in learning mode.
//!
//! Status codes: 200 grant, 204 released, 400 malformed body (JSON error naming the
//! field), 401 missing or wrong bearer token, 404 unknown budget, 413 oversized body.
//! A refused request never touches the ledger.

use crate::ledger::{BudgetConfig, Ledger};
use crate::protocol::{ErrorBody, Grant, LeaseRequest, Snapshot};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Largest accepted request body. A lease request is about 150 bytes; 16 KiB leaves room
/// for long member names without letting a peer make the coordinator buffer megabytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// `namespace/name` of a budget (the ThrottledConsumer's identity under Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetId {
    pub namespace: String,
    pub name: String,
}

impl BudgetId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for BudgetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug)]
struct Entry {
    ledger: Ledger,
    token: String,
}

/// Counters for the embedding process's metrics.
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    pub refreshes: AtomicU64,
    pub releases: AtomicU64,
    /// Requests refused with a 4xx.
    pub rejected: AtomicU64,
}

/// All budgets served by one process.
#[derive(Debug)]
pub struct Coordinator {
    /// Origin of the ledgers' millisecond clock, and the restart instant for learning.
    started: Instant,
    budgets: RwLock<HashMap<BudgetId, Arc<Mutex<Entry>>>>,
    stats: CoordinatorStats,
}

fn lock(entry: &Mutex<Entry>) -> std::sync::MutexGuard<'_, Entry> {
    // A panic while holding the lock cannot leave a ledger half-updated in a way that
    // breaks the invariant worse than refusing service would, so keep serving.
    entry.lock().unwrap_or_else(|e| e.into_inner())
}

impl Coordinator {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            budgets: RwLock::new(HashMap::new()),
            stats: CoordinatorStats::default(),
        })
    }

    /// Milliseconds since this coordinator started: the ledgers' clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn stats(&self) -> &CoordinatorStats {
        &self.stats
    }

    fn entry(&self, id: &BudgetId) -> Option<Arc<Mutex<Entry>>> {
        self.budgets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Creates a budget or changes it live (capacity, policy, expected members, timings,
    /// token). A change takes effect as members refresh, decrease before increase.
    pub fn upsert(&self, id: BudgetId, config: BudgetConfig, token: String) {
        if let Some(entry) = self.entry(&id) {
            let mut e = lock(&entry);
            e.ledger.set_config(config);
            e.token = token;
            return;
        }
        let now = self.now_ms();
        let ledger = if now < config.lease_ms.saturating_add(config.fallback_ms) {
            Ledger::restarted(config, 0)
        } else {
            Ledger::new(config)
        };
        tracing::info!(budget = %id, "Budget created");
        self.budgets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(|| Arc::new(Mutex::new(Entry { ledger, token })));
    }

    /// Sets only the expected members (desired replicas) of a budget.
    pub fn set_expected_members(&self, id: &BudgetId, expected: u32) -> bool {
        match self.entry(id) {
            Some(entry) => {
                lock(&entry).ledger.set_expected_members(expected);
                true
            }
            None => false,
        }
    }

    /// [`Ledger::release_terminated`] on budget `id` now (false for an unknown budget).
    pub fn release_terminated(
        &self,
        id: &BudgetId,
        member: &str,
        incarnation: &str,
        in_flight_for: Duration,
    ) -> bool {
        let Some(entry) = self.entry(id) else {
            return false;
        };
        let now = self.now_ms();
        let ms = u64::try_from(in_flight_for.as_millis()).unwrap_or(u64::MAX);
        let released = lock(&entry)
            .ledger
            .release_terminated(now, member, incarnation, ms);
        if released {
            self.stats.releases.fetch_add(1, Ordering::Relaxed);
        }
        released
    }

    pub fn remove(&self, id: &BudgetId) -> bool {
        let removed = self
            .budgets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some();
        if removed {
            tracing::info!(budget = %id, "Budget removed");
        }
        removed
    }

    pub fn ids(&self) -> Vec<BudgetId> {
        let mut ids: Vec<BudgetId> = self
            .budgets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    pub fn snapshot(&self, id: &BudgetId) -> Option<Snapshot> {
        let entry = self.entry(id)?;
        let now = self.now_ms();
        let mut e = lock(&entry);
        e.ledger.expire(now);
        Some(e.ledger.snapshot(&id.namespace, &id.name, now))
    }

    /// Replaces the whole set of budgets (the standalone coordinator's file reload):
    /// upserts every entry and removes budgets no longer listed.
    pub fn replace_all(&self, budgets: Vec<(BudgetId, BudgetConfig, String)>) {
        let keep: std::collections::HashSet<BudgetId> =
            budgets.iter().map(|(id, _, _)| id.clone()).collect();
        for id in self.ids() {
            if !keep.contains(&id) {
                self.remove(&id);
            }
        }
        for (id, config, token) in budgets {
            self.upsert(id, config, token);
        }
    }

    fn authorized(
        &self,
        id: &BudgetId,
        headers: &HeaderMap,
    ) -> Result<Arc<Mutex<Entry>>, ApiError> {
        let entry = self
            .entry(id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown budget {id}")))?;
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing bearer token: send 'Authorization: Bearer <token>'",
                )
            })?;
        let ok: bool = presented
            .as_bytes()
            .ct_eq(lock(&entry).token.as_bytes())
            .into();
        if ok {
            Ok(entry)
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!("wrong bearer token for budget {id}"),
            ))
        }
    }
}

/// A refused request: status and a message for the JSON error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// Parses and validates a lease request body (pure).
pub fn parse_lease_request(body: &[u8]) -> Result<LeaseRequest, ApiError> {
    let req: LeaseRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid lease request: {e}"),
        )
    })?;
    req.validate().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid lease request: {e}"),
        )
    })?;
    Ok(req)
}

/// The lease protocol's routes.
pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/budgets/{namespace}/{name}/leases", post(refresh))
        .route(
            "/v1/budgets/{namespace}/{name}/leases/{member}",
            delete(release),
        )
        .route("/v1/budgets/{namespace}/{name}", get(snapshot))
        .route("/livez", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(coord)
}

/// Serves the protocol on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coord: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(coord))
        .with_graceful_shutdown(shutdown)
        .await
}

fn rejected(coord: &Coordinator, e: ApiError) -> Response {
    coord.stats.rejected.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

async fn refresh(
    State(coord): State<Arc<Coordinator>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = BudgetId::new(namespace, name);
    let entry = match coord.authorized(&id, &headers) {
        Ok(e) => e,
        Err(e) => return rejected(&coord, e),
    };
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            let status = r.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("request body larger than {MAX_BODY_BYTES} bytes")
            } else {
                r.body_text()
            };
            return rejected(&coord, ApiError::new(status, message));
        }
    };
    let req = match parse_lease_request(&body) {
        Ok(r) => r,
        Err(e) => return rejected(&coord, e),
    };
    let now = coord.now_ms();
    let grant: Grant = lock(&entry).ledger.refresh(now, &req);
    coord.stats.refreshes.fetch_add(1, Ordering::Relaxed);
    tracing::trace!(budget = %id, member = %req.member, rate = grant.rate, in_flight = grant.in_flight, "Lease granted");
    Json(grant).into_response()
}

/// `DELETE .../leases/{member}?incarnation=HEX`: the run that releases (optional, for
/// older clients).
#[derive(serde::Deserialize)]
struct ReleaseParams {
    incarnation: Option<String>,
}

async fn release(
    State(coord): State<Arc<Coordinator>>,
    Path((namespace, name, member)): Path<(String, String, String)>,
    params: Result<Query<ReleaseParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let id = BudgetId::new(namespace, name);
    let entry = match coord.authorized(&id, &headers) {
        Ok(e) => e,
        Err(e) => return rejected(&coord, e),
    };
    if let Err(e) = crate::protocol::validate_member(&member) {
        return rejected(&coord, ApiError::new(StatusCode::BAD_REQUEST, e));
    }
    let incarnation = match params {
        Ok(Query(p)) => p.incarnation,
        Err(e) => {
            let e = ApiError::new(StatusCode::BAD_REQUEST, format!("query: {}", e.body_text()));
            return rejected(&coord, e);
        }
    };
    if let Some(i) = &incarnation {
        if let Err(e) = crate::protocol::validate_incarnation(i) {
            let e = ApiError::new(StatusCode::BAD_REQUEST, format!("incarnation: {e}"));
            return rejected(&coord, e);
        }
    }
    let now = coord.now_ms();
    let known = lock(&entry)
        .ledger
        .release_run(now, &member, incarnation.as_deref());
    coord.stats.releases.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(budget = %id, %member, known, "Lease released");
    StatusCode::NO_CONTENT.into_response()
}

async fn snapshot(
    State(coord): State<Arc<Coordinator>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = BudgetId::new(namespace, name);
    if let Err(e) = coord.authorized(&id, &headers) {
        return rejected(&coord, e);
    }
    match coord.snapshot(&id) {
        Some(s) => Json(s).into_response(),
        None => rejected(
            &coord,
            ApiError::new(StatusCode::NOT_FOUND, format!("unknown budget {id}")),
        ),
    }
}

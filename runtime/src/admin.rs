//! Admin HTTP: `/livez`, `/readyz`, `/metrics`. Takes a bound listener so tests can
//! use port 0.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lease::{Allowance, AllowanceSource};
use crate::pipeline::Shared;

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    allowance: watch::Receiver<Allowance>,
}

pub fn router(shared: Arc<Shared>, allowance: watch::Receiver<Allowance>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { shared, allowance })
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Ready once the replica is in its group (an assignment, possibly empty, arrived), a
/// broker answers, and it holds a lease or a fallback share. A replica without partitions is still ready:
/// otherwise a fleet with more replicas than partitions would block rollouts.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let joined = s.shared.joined.load(AtomicOrdering::Relaxed);
    let brokers_down = s.shared.lock().brokers_down;
    let source = s.allowance.borrow().source;
    if joined && !brokers_down && source != AllowanceSource::Pending {
        (StatusCode::OK, "ready".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "joined group: {joined}, brokers reachable: {}, allowance: {}",
                !brokers_down,
                source.as_str()
            ),
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.shared.metrics.encode(),
    )
}

//! Admin HTTP: `/livez`, `/readyz`, `/metrics`. Takes a bound listener so tests can
//! use port 0.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::allowance::{Allowance, AllowanceOrigin};
use crate::state::Status;

#[derive(Clone)]
struct AdminState {
    status: Status,
    allowance: watch::Receiver<Allowance>,
}

pub fn router(status: Status, allowance: watch::Receiver<Allowance>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { status, allowance })
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Ready once the replica is in its group (an assignment, possibly empty, arrived), a
/// broker answers, and it holds a lease or a fallback share. A replica without
/// partitions is still ready: otherwise a fleet with more replicas than partitions
/// would block rollouts.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let joined = s.status.joined();
    let brokers_down = s.status.brokers_down();
    let origin = s.allowance.borrow().origin;
    if joined && !brokers_down && origin != AllowanceOrigin::Pending {
        (StatusCode::OK, "ready".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "joined group: {joined}, brokers reachable: {}, allowance: {}",
                !brokers_down,
                origin.as_str()
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
        s.status.metrics().encode(),
    )
}

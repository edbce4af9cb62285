//! Admin HTTP: `/livez`, `/readyz` (after the watches have synced) and `/metrics`.
//! Served on its own port, apart from the budget protocol, so probes and scrapes never
//! queue behind lease traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the ThrottledConsumer watch has listed everything: before that the
    /// coordinator may not know budgets that replicas are asking for.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the ThrottledConsumer watch to sync",
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

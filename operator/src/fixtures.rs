//! Test fixtures: objects from the YAML examples, a fixed clock, and a scripted mock API
//! server (tower-test) that asserts every request the reconciler makes.
//!
//! A conversation is a list of [`Step`]s. The mock answers each expected request in
//! order and fails the test on any other; a reconcile that makes an extra request waits
//! for an answer that never comes, and the [`TIMEOUT`] turns that into a failure.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::chrono::{DateTime, TimeZone, Utc};
use kube::client::Body;
use kube::Client;
use pacer_budget::service::Coordinator;
use serde_json::{json, Value};

use crate::build::BuildSettings;
use crate::crd::ThrottledConsumer;
use crate::metrics::Metrics;
use crate::reconcile::Context;

/// Longest a whole mocked conversation may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub const ORDERS_SYNC: &str = include_str!("../../crds/examples/orders-sync.yaml");
pub const MINIMAL: &str = include_str!("../../crds/examples/minimal.yaml");

pub const UID: &str = "6f1c7e9a-0000-4000-8000-000000000001";

/// A ThrottledConsumer parsed from example YAML, as the API server would return it:
/// namespace, uid and generation set.
pub fn tc_from_yaml(yaml: &str) -> ThrottledConsumer {
    let mut tc: ThrottledConsumer = serde_yaml::from_str(yaml).expect("example parses");
    tc.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    tc.metadata.uid = Some(UID.into());
    tc.metadata.generation = Some(1);
    tc
}

pub fn settings() -> BuildSettings {
    BuildSettings {
        image: "ghcr.io/pacer-dev/pacer:0.1.0".into(),
        coordinator_url: "http://pacer-operator.pacer-system.svc:8080".into(),
    }
}

/// 2026-01-02T03:04:05Z.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

/// A context whose client talks to a tower-test mock.
pub fn context(coordinator: Arc<Coordinator>) -> (Arc<Context>, ApiServerVerifier) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Context::new(
        client,
        coordinator,
        Arc::new(Metrics::new()),
        settings(),
        Arc::new(now),
        Duration::from_secs(10),
    );
    (Arc::new(ctx), ApiServerVerifier(handle))
}

/// One expected request and the answer to it.
#[derive(Debug, Clone)]
pub struct Step {
    pub method: Method,
    pub uri: String,
    pub status: StatusCode,
    /// The response body; `None` echoes the request body back (what an apply returns,
    /// near enough).
    pub response: Option<Value>,
    /// For a status patch: the object whose `status` the request replaces, returned
    /// whole as the API server would.
    pub status_of: Option<Value>,
}

impl Step {
    pub fn new(
        method: Method,
        uri: impl Into<String>,
        status: StatusCode,
        response: Option<Value>,
    ) -> Self {
        Self {
            method,
            uri: uri.into(),
            status,
            response,
            status_of: None,
        }
    }

    /// A status apply, answered with `tc` carrying the sent status.
    pub fn status_apply(uri: impl Into<String>, tc: &ThrottledConsumer) -> Self {
        Self {
            status_of: Some(serde_json::to_value(tc).unwrap()),
            ..Self::echo(Method::PATCH, uri)
        }
    }

    pub fn get_404(uri: impl Into<String>) -> Self {
        Self::new(Method::GET, uri, StatusCode::NOT_FOUND, Some(not_found()))
    }

    pub fn get(uri: impl Into<String>, body: Value) -> Self {
        Self::new(Method::GET, uri, StatusCode::OK, Some(body))
    }

    pub fn echo(method: Method, uri: impl Into<String>) -> Self {
        Self::new(method, uri, StatusCode::OK, None)
    }
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

/// A request the mock received: method, URI and JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub body: Value,
}

/// The API server side of the mock.
#[derive(Debug)]
pub struct ApiServerVerifier(pub tower_test::mock::Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// Answers `steps` in order, asserting method and URI, and returns what was sent.
    pub async fn run(mut self, steps: Vec<Step>) -> (Self, Vec<Seen>) {
        let mut seen = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) = self.0.next_request().await.expect("service not called");
            let method = request.method().clone();
            let uri = request.uri().to_string();
            assert_eq!(
                (&method, uri.as_str()),
                (&step.method, step.uri.as_str()),
                "request {i} differs"
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            };
            let response = match (&step.response, &step.status_of) {
                (Some(fixed), _) => fixed.clone(),
                (None, Some(obj)) => {
                    let mut obj = obj.clone();
                    obj["status"] = body["status"].clone();
                    obj
                }
                (None, None) => body.clone(),
            };
            send.send_response(
                Response::builder()
                    .status(step.status)
                    .body(Body::from(serde_json::to_vec(&response).unwrap()))
                    .unwrap(),
            );
            seen.push(Seen { method, body });
        }
        (self, seen)
    }
}

/// Runs `reconcile` against the scripted API and returns its result and the requests.
pub async fn converse<F, T>(
    verifier: ApiServerVerifier,
    steps: Vec<Step>,
    reconcile: F,
) -> (T, Vec<Seen>, ApiServerVerifier)
where
    F: std::future::Future<Output = T>,
{
    let server = tokio::spawn(verifier.run(steps));
    let Ok(result) = tokio::time::timeout(TIMEOUT, reconcile).await else {
        // A failed assertion in the mock leaves the reconcile waiting: report that first.
        if server.is_finished() {
            if let Err(e) = server.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        panic!("reconcile did not finish within {TIMEOUT:?}: it made a request the script does not expect");
    };
    let (verifier, seen) = tokio::time::timeout(TIMEOUT, server)
        .await
        .expect("every expected request was made")
        .expect("mock server did not panic");
    (result, seen, verifier)
}

/// URIs of a namespaced object's children.
pub struct Uris {
    pub ns: String,
    pub name: String,
}

impl Uris {
    pub fn of(tc: &ThrottledConsumer) -> Self {
        Self {
            ns: tc.metadata.namespace.clone().unwrap(),
            name: tc.metadata.name.clone().unwrap(),
        }
    }
    pub fn secret(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/secrets/{}-budget-token",
            self.ns, self.name
        )
    }
    pub fn secret_create(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/secrets?&fieldManager=pacer-operator",
            self.ns
        )
    }
    pub fn deployment(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/deployments/{}",
            self.ns, self.name
        )
    }
    pub fn deployment_apply(&self) -> String {
        format!(
            "{}?&force=true&fieldManager=pacer-operator",
            self.deployment()
        )
    }
    pub fn pdb(&self) -> String {
        format!(
            "/apis/policy/v1/namespaces/{}/poddisruptionbudgets/{}",
            self.ns, self.name
        )
    }
    pub fn pdb_apply(&self) -> String {
        format!("{}?&force=true&fieldManager=pacer-operator", self.pdb())
    }
    pub fn status_apply(&self) -> String {
        format!(
            "/apis/pacer.dev/v1alpha1/namespaces/{}/throttledconsumers/{}/status?&force=true&fieldManager=pacer-operator",
            self.ns, self.name
        )
    }
}

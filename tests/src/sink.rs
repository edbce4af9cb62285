//! A recording HTTP sink on port 0: every request with its start and end instant, its
//! Kafka coordinates and message id, and the concurrency it saw; answers as a test's
//! [`Behaviour`] says. Shared by the runtime's tests and the fleet tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

/// What the test sink saw for one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub start: Instant,
    pub end: Instant,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The id at the start of the value (see [`crate::Kafka::produce`]), if any.
    pub id: Option<usize>,
    pub body_len: usize,
    /// 1 for the first request for this (partition, offset), 2 for the next...
    pub attempt: u32,
    pub status: u16,
    pub headers: HashMap<String, String>,
}

/// What the sink answers: after `delay`, `status` with an optional `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub delay: Duration,
    pub status: u16,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub const OK: Reply = Reply {
        delay: Duration::ZERO,
        status: 200,
        retry_after: None,
    };
}

pub type Behaviour = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub struct SinkState {
    pub seen: Mutex<Vec<Seen>>,
    pub current: AtomicU32,
    pub max_concurrent: AtomicU32,
    /// While set, requests wait (a stalled service).
    pub stalled: AtomicBool,
    attempts: Mutex<HashMap<(i32, i64), u32>>,
    behaviour: Behaviour,
}

impl std::fmt::Debug for SinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkState")
            .field("requests", &self.requests())
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

impl SinkState {
    /// Delivered (2xx) requests.
    pub fn delivered(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .cloned()
            .collect()
    }

    pub fn delivered_count(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .count()
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

#[derive(Debug)]
pub struct TestSink {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSink {
    pub async fn start(behaviour: Behaviour) -> TestSink {
        let state = Arc::new(SinkState {
            seen: Mutex::new(Vec::new()),
            current: AtomicU32::new(0),
            max_concurrent: AtomicU32::new(0),
            stalled: AtomicBool::new(false),
            attempts: Mutex::new(HashMap::new()),
            behaviour,
        });
        // `/moved` answers any GET with 200: a client that followed a redirect (turning
        // the POST into a bodiless GET) would count a message as delivered there.
        let app = Router::new()
            .route("/", post(handle))
            .route("/moved", axum::routing::get(|| async { StatusCode::OK }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestSink { addr, state, task }
    }

    pub async fn ok() -> TestSink {
        Self::start(Arc::new(|_| Reply::OK)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a request as held by the sink until its handler ends: answered, or dropped
/// because the client went away. A SIGKILLed replica's requests are dropped mid-way;
/// counting them down only on an answer left them held forever and made the sink report
/// 9 at once under an in-flight budget of 8 (a CI run of the SIGKILL fleet scenario).
struct Held(Arc<SinkState>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(s): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let now = s.current.fetch_add(1, Ordering::SeqCst) + 1;
    let _held = Held(s.clone());
    s.max_concurrent.fetch_max(now, Ordering::SeqCst);
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let partition: i32 = h("kafka-partition")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let offset: i64 = h("kafka-offset").and_then(|v| v.parse().ok()).unwrap_or(-1);
    let attempt = {
        let mut a = s.attempts.lock().unwrap();
        let e = a.entry((partition, offset)).or_default();
        *e += 1;
        *e
    };
    let id = std::str::from_utf8(&body[..body.len().min(8)])
        .ok()
        .and_then(|v| v.parse().ok());
    let mut seen = Seen {
        start,
        end: start,
        partition,
        offset,
        key: h("kafka-key"),
        id,
        body_len: body.len(),
        attempt,
        status: 0,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
    };
    // A stalled sink holds requests (bounded, so a broken test cannot hang forever).
    let stall_until = Instant::now() + Duration::from_secs(120);
    while s.stalled.load(Ordering::SeqCst) && Instant::now() < stall_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = (s.behaviour)(&seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    seen.end = Instant::now();
    seen.status = reply.status;
    s.seen.lock().unwrap().push(seen);
    let status = StatusCode::from_u16(reply.status).unwrap();
    match reply.retry_after {
        Some(secs) => (status, [("retry-after", secs.to_string())]).into_response(),
        None if status.is_redirection() => (status, [("location", "/moved")]).into_response(),
        None => status.into_response(),
    }
}

/// How often the sink saw each message id (delivered requests).
pub fn ids(sink: &TestSink) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for s in sink.state.delivered() {
        if let Some(id) = s.id {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}

impl TestSink {
    /// Start instants of the delivered (2xx) requests, sorted.
    pub fn starts(&self) -> Vec<Instant> {
        let mut v: Vec<Instant> = self.state.delivered().iter().map(|s| s.start).collect();
        v.sort();
        v
    }

    /// The most requests the sink ever held at once.
    pub fn max_concurrent(&self) -> u32 {
        self.state.max_concurrent.load(Ordering::SeqCst)
    }
}

/// The most arrivals in any window of length `len` that starts at an arrival in
/// `[from, until)`, and where that window starts (`starts` sorted).
pub fn busiest(
    starts: &[Instant],
    from: Instant,
    until: Instant,
    len: Duration,
) -> (usize, Instant) {
    let mut best = (0, from);
    let mut end = 0;
    for (i, a) in starts
        .iter()
        .enumerate()
        .filter(|(_, a)| **a >= from && **a < until)
    {
        end = end.max(i);
        while end < starts.len() && starts[end] < *a + len {
            end += 1;
        }
        if end - i > best.0 {
            best = (end - i, *a);
        }
    }
    best
}

/// Arrivals in `[from, to)` (`starts` sorted).
pub fn count_between(starts: &[Instant], from: Instant, to: Instant) -> usize {
    starts.partition_point(|t| *t < to) - starts.partition_point(|t| *t < from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that goes away mid-request (a SIGKILLed replica) no longer counts as held.
    #[tokio::test]
    async fn a_request_whose_client_went_away_is_not_held_forever() {
        let sink = TestSink::start(Arc::new(|_| Reply {
            delay: Duration::from_secs(30),
            ..Reply::OK
        }))
        .await;
        let state = sink.state.clone();
        let sent = reqwest::Client::new()
            .post(sink.url())
            .body("00000001")
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        assert!(sent.is_err(), "the client gave up after 200 ms");
        crate::process::wait_for(
            "the dropped request to be let go",
            Duration::from_secs(10),
            || state.current.load(Ordering::SeqCst) == 0,
        )
        .await;
        assert_eq!(sink.max_concurrent(), 1);
    }

    #[test]
    fn the_busiest_window_starts_at_an_arrival_and_counts_only_inside_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = vec![
            at(0),
            at(100),
            at(950),
            at(990),
            at(1000),
            at(1010),
            at(3000),
        ];
        // From 100: 100, 950, 990, 1000, 1010 fall in [100, 1100); from 0 only four.
        assert_eq!(
            busiest(&s, at(0), at(4000), Duration::from_secs(1)),
            (5, at(100))
        );
        // No window starts before `from`: from 500 on, 950 leads four.
        assert_eq!(
            busiest(&s, at(500), at(4000), Duration::from_secs(1)),
            (4, at(950))
        );
        // Windows may only start in [from, until): from 3000 on, one arrival.
        assert_eq!(
            busiest(&s, at(2000), at(4000), Duration::from_secs(1)),
            (1, at(3000))
        );
        assert_eq!(
            busiest(&[], at(0), at(1), Duration::from_secs(1)),
            (0, at(0))
        );
        assert_eq!(count_between(&s, at(100), at(1000)), 3);
        assert_eq!(count_between(&s, at(5000), at(6000)), 0);
    }
}

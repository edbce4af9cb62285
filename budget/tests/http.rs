//! The coordinator over real HTTP on 127.0.0.1:0, driven by the real client.

use pacer_budget::client::{self, ClientConfig, Demand, Lease, LeaseHandle, LeaseOrigin};
use pacer_budget::service::{self, BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Policy, Share};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout, Instant};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

struct Server {
    coord: Arc<Coordinator>,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config: BudgetConfig) -> Self {
        let coord = Coordinator::new();
        coord.upsert(BudgetId::new("ns", "orders"), config, TOKEN.into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(service::serve(listener, coord.clone(), async {
            let _ = rx.await;
        }));
        Self {
            coord,
            url,
            stop: Some(tx),
            task,
        }
    }

    /// Started and past its learning window, so grants are ordinary.
    async fn ready(config: BudgetConfig) -> Self {
        let s = Self::start(config).await;
        past_learning(&s).await;
        s
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.task.await;
    }
}

/// Short timings so tests see expiries quickly (learning lasts lease + fallback = 1 s).
fn config(rate: f64, in_flight: u32, policy: Policy, expected: u32) -> BudgetConfig {
    BudgetConfig {
        capacity: Share::new(rate, in_flight),
        policy,
        expected_members: expected,
        lease_ms: 600,
        refresh_ms: 100,
        fallback_ms: 400,
    }
}

fn client_config(url: &str, member: &str) -> ClientConfig {
    ClientConfig {
        base_url: url.into(),
        namespace: "ns".into(),
        name: "orders".into(),
        token: TOKEN.into(),
        member: member.into(),
    }
}

fn busy() -> watch::Receiver<Demand> {
    watch::channel(Demand {
        demand: Share::new(1_000.0, 100),
        observed_rate: None,
    })
    .1
}

/// Waits until `pred` holds for the lease, at most `within`.
async fn await_lease(h: &LeaseHandle, within: Duration, pred: impl Fn(&Lease) -> bool) -> Lease {
    let mut rx = h.lease();
    timeout(within, async {
        loop {
            let l = *rx.borrow_and_update();
            if pred(&l) {
                return l;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "lease condition not met within {within:?}; last {:?}",
            *h.lease().borrow()
        )
    })
}

/// A coordinator started in this process begins in learning mode for lease + fallback;
/// tests that want ordinary grants wait that out once.
async fn past_learning(s: &Server) {
    let id = BudgetId::new("ns", "orders");
    timeout(Duration::from_secs(5), async {
        while s.coord.snapshot(&id).unwrap().learning || s.coord.now_ms() < 1_000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_joining_leaving_and_crashing_never_hold_more_than_the_budget() {
    let cap = Share::new(100.0, 10);
    let s = Server::ready(config(cap.rate, cap.in_flight, Policy::Demand, 3)).await;

    // (member, joins after ms, leaves after ms, crashes instead of releasing)
    let plan = [
        ("a", 0, 2_500, false),
        ("b", 0, 1_200, true),
        ("c", 300, 2_500, false),
        ("d", 600, 1_800, false),
        ("e", 900, 2_500, true),
        ("f", 1_400, 2_500, false),
    ];
    let start = Instant::now();
    let mut handles: Vec<Option<LeaseHandle>> = plan.iter().map(|_| None).collect();
    let mut done = vec![false; plan.len()];
    let mut max_seen = Share::ZERO;
    let mut granted_seen = 0u32;
    // Sample every 2 ms for 3 s (bounded), joining and leaving as planned.
    for _ in 0..1_500 {
        let t = start.elapsed().as_millis() as u64;
        if t > 3_000 {
            break;
        }
        for (i, &(m, join, leave, crash)) in plan.iter().enumerate() {
            if handles[i].is_none() && !done[i] && t >= join {
                handles[i] = Some(client::spawn(client_config(&s.url, m), busy()));
            }
            if t >= leave && handles[i].is_some() {
                let h = handles[i].take().unwrap();
                done[i] = true;
                if crash {
                    h.abort();
                } else {
                    h.release().await;
                }
            }
        }
        let mut sum = Share::ZERO;
        for h in handles.iter().flatten() {
            let l = *h.lease().borrow();
            sum.rate += l.share.rate;
            sum.in_flight += l.share.in_flight;
            granted_seen += u32::from(l.origin == LeaseOrigin::Granted);
        }
        assert!(
            sum.rate <= cap.rate + 1e-9,
            "clients hold {sum} > budget {cap} at {t} ms"
        );
        assert!(
            sum.in_flight <= cap.in_flight,
            "clients hold {sum} > budget {cap} at {t} ms"
        );
        max_seen = max_seen.max(sum);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(granted_seen > 0, "no client was ever granted anything");
    assert!(
        max_seen.rate > cap.rate * 0.9,
        "budget was never used: max {max_seen}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_live_budget_change_reaches_clients_within_a_refresh() {
    let s = Server::ready(config(100.0, 10, Policy::Equal, 2)).await;
    let a = client::spawn(client_config(&s.url, "a"), busy());
    let b = client::spawn(client_config(&s.url, "b"), busy());
    await_lease(&a, Duration::from_secs(2), |l| {
        l.share == Share::new(50.0, 5)
    })
    .await;
    await_lease(&b, Duration::from_secs(2), |l| {
        l.share == Share::new(50.0, 5)
    })
    .await;
    s.coord.upsert(
        BudgetId::new("ns", "orders"),
        config(20.0, 4, Policy::Equal, 2),
        TOKEN.into(),
    );
    // One refresh is 100 ms (±10 %); the bound leaves room for a loaded CI machine.
    let within = Duration::from_millis(400);
    await_lease(&a, within, |l| l.share == Share::new(10.0, 2)).await;
    await_lease(&b, within, |l| l.share == Share::new(10.0, 2)).await;
    a.release().await;
    b.release().await;
    let snap = s.coord.snapshot(&BudgetId::new("ns", "orders")).unwrap();
    assert!(
        snap.members.is_empty(),
        "released members remain: {:?}",
        snap.members
    );
    s.stop().await;
}

#[tokio::test]
async fn a_client_falls_back_when_the_coordinator_is_gone_then_stops_after_the_window() {
    let s = Server::ready(config(100.0, 10, Policy::Equal, 4)).await;
    let a = client::spawn(client_config(&s.url, "a"), busy());
    let l = await_lease(&a, Duration::from_secs(2), |l| {
        l.origin == LeaseOrigin::Granted
    })
    .await;
    assert_eq!(l.share, Share::new(25.0, 3));
    s.stop().await;
    let fb = await_lease(&a, Duration::from_secs(2), |l| {
        l.origin == LeaseOrigin::Fallback
    })
    .await;
    assert_eq!(
        fb.share,
        Share::new(25.0, 2),
        "fallback is an equal split over expected members"
    );
    let none = await_lease(&a, Duration::from_secs(2), |l| {
        l.origin == LeaseOrigin::None
    })
    .await;
    assert_eq!(none.share, Share::ZERO);
    a.abort();
}

#[tokio::test]
async fn a_new_coordinator_learns_before_granting_new_members() {
    let s = Server::start(config(100.0, 10, Policy::Equal, 1)).await;
    // Fresh coordinator: in learning mode, a new member gets nothing...
    let a = client::spawn(client_config(&s.url, "a"), busy());
    let first = await_lease(&a, Duration::from_secs(2), |l| {
        l.origin == LeaseOrigin::Granted
    })
    .await;
    assert_eq!(first.share, Share::ZERO);
    // ...and after lease + fallback (1 s here), its share.
    await_lease(&a, Duration::from_secs(3), |l| {
        l.share == Share::new(100.0, 10)
    })
    .await;
    a.release().await;
    s.stop().await;
}

mod bad_input {
    use super::*;

    async fn post(url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn each_bad_request_gets_its_status_and_a_json_error_and_leaves_the_ledger_unchanged() {
        let s = Server::start(config(100.0, 10, Policy::Demand, 1)).await;
        let url = format!("{}/v1/budgets/ns/orders/leases", s.url);
        let good = br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1}}"#.to_vec();
        let huge = {
            let mut v = br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1},"x":""#.to_vec();
            v.extend(std::iter::repeat_n(b'a', 100_000));
            v.extend(br#""}"#);
            v
        };
        // (what, url, token, body, status, error message excerpt)
        type Case<'a> = (&'a str, String, Option<&'a str>, Vec<u8>, u16, &'a str);
        let cases: Vec<Case> = vec![
            ("malformed json", url.clone(), Some(TOKEN), b"{not json".to_vec(), 400, "invalid lease request"),
            ("unknown field", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1},"colour":"blue"}"#.to_vec(), 400, "unknown field `colour`"),
            ("negative rate", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":-1.0,"inFlight":1}}"#.to_vec(), 400, "demand.rate: must be a finite number >= 0, got -1"),
            ("NaN rate", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":NaN,"inFlight":1}}"#.to_vec(), 400, "invalid lease request"),
            ("overflowing rate", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1e999,"inFlight":1}}"#.to_vec(), 400, "invalid lease request"),
            ("negative in-flight", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":-2}}"#.to_vec(), 400, "invalid lease request"),
            ("bad member name", url.clone(), Some(TOKEN),
                br#"{"member":"a/b","demand":{"rate":1.0,"inFlight":1}}"#.to_vec(), 400, "member: only letters"),
            ("negative holding", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1},"holding":{"rate":-5,"inFlight":0}}"#.to_vec(), 400, "holding.rate"),
            ("bad incarnation", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1},"incarnation":"Not-Hex"}"#.to_vec(), 400, "incarnation: \"Not-Hex\" is not 1 to 64 lowercase hexadecimal digits"),
            ("fallback window over a day", url.clone(), Some(TOKEN),
                br#"{"member":"m-1","demand":{"rate":1.0,"inFlight":1},"holdingFallbackMs":86400001}"#.to_vec(), 400, "holdingFallbackMs: 86400001 is out of range, must be 0 to 86400000"),
            ("huge body", url.clone(), Some(TOKEN), huge, 413, "larger than"),
            ("missing token", url.clone(), None, good.clone(), 401, "missing bearer token"),
            ("wrong token", url.clone(), Some("not-the-token"), good.clone(), 401, "wrong bearer token"),
            ("unknown budget", format!("{}/v1/budgets/ns/nope/leases", s.url), Some(TOKEN), good.clone(), 404, "unknown budget ns/nope"),
        ];
        let id = BudgetId::new("ns", "orders");
        let before = s.coord.snapshot(&id).unwrap();
        for (what, url, token, body, status, msg) in cases {
            let (got, json) = post(&url, token, body).await;
            assert_eq!(got, status, "{what}: {json}");
            let err = json["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no JSON error: {json}"));
            assert!(err.contains(msg), "{what}: error {err:?} lacks {msg:?}");
            let after = s.coord.snapshot(&id).unwrap();
            assert_eq!(after.members, before.members, "{what} changed the ledger");
            assert_eq!(after.epoch, before.epoch);
        }
        // The good request works, so the refusals above were about the input.
        let (got, json) = post(&url, Some(TOKEN), good).await;
        assert_eq!(got, 200, "{json}");
        assert_eq!(s.coord.snapshot(&id).unwrap().members.len(), 1);
        s.stop().await;
    }

    #[tokio::test]
    async fn release_and_snapshot_require_the_token() {
        let s = Server::start(config(100.0, 10, Policy::Demand, 1)).await;
        let http = reqwest::Client::new();
        let r = http
            .delete(format!("{}/v1/budgets/ns/orders/leases/m-1", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let r = http
            .get(format!("{}/v1/budgets/ns/orders", s.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let r = http
            .get(format!("{}/v1/budgets/ns/orders", s.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let snap: pacer_budget::Snapshot = r.json().await.unwrap();
        assert_eq!(snap.capacity, Share::new(100.0, 10));
        let r = http
            .delete(format!("{}/v1/budgets/ns/orders/leases/m-1", s.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        // The releasing run, if named, must look like one.
        let r = http
            .delete(format!(
                "{}/v1/budgets/ns/orders/leases/m-1?incarnation=../x",
                s.url
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body = r.text().await.unwrap();
        assert!(
            body.contains(r#"incarnation: \"../x\" is not 1 to 64 lowercase hexadecimal digits"#),
            "{body}"
        );
        let r = http
            .delete(format!(
                "{}/v1/budgets/ns/orders/leases/m-1?incarnation=00ff",
                s.url
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        s.stop().await;
    }
}

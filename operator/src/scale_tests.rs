//! Scale 3 -> 5 -> 3 end to end, minus Kubernetes: the reconciler talks to a mocked API
//! server, the embedded coordinator serves the real lease protocol on loopback, and
//! real budget clients play the replicas. A meter records the sum of the shares the
//! members may use after every lease change and the test asserts it never exceeds the
//! budget.
//!
//! The test runs on tokio's current-thread runtime, whose run queue is FIFO: a member's
//! meter task woken by a shrink runs before any task woken later by the grow that the
//! shrink made room for, so the meter sees changes in the order they happened.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use pacer_budget::client::{self, ClientConfig, Demand, LeaseHandle};
use pacer_budget::service::{self, BudgetId, Coordinator};
use pacer_budget::Share;
use tokio::sync::{oneshot, watch};

use crate::build;
use crate::crd::BudgetPolicy;
use crate::fixtures::{self, converse, tc_from_yaml, Step, Uris, MINIMAL};
use crate::reconcile::reconcile_one;

const RATE: f64 = 30.0;
const IN_FLIGHT: u32 = 6;
/// Whole-test bound: the coordinator's learning window after start (lease + fallback =
/// 4 s with 1 s leases) plus a few refresh rounds.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most lease changes one member's meter task records; far above the ~100 a member sees.
const MAX_CHANGES: usize = 100_000;

/// The current share of every member and the largest sums seen.
#[derive(Debug, Default)]
struct Meter {
    shares: Vec<Share>,
    max_rate: f64,
    max_in_flight: u32,
    changes: usize,
}

impl Meter {
    fn record(&mut self, member: usize, share: Share) {
        if self.shares.len() <= member {
            self.shares.resize(member + 1, Share::ZERO);
        }
        self.shares[member] = share;
        let rate: f64 = self.shares.iter().map(|s| s.rate).sum();
        let in_flight: u32 = self.shares.iter().map(|s| s.in_flight).sum();
        self.max_rate = self.max_rate.max(rate);
        self.max_in_flight = self.max_in_flight.max(in_flight);
        self.changes += 1;
    }
}

struct Fleet {
    config: ClientConfig,
    demand: watch::Receiver<Demand>,
    meter: Arc<Mutex<Meter>>,
    /// Current shares, for awaiting conditions.
    shares_tx: watch::Sender<Vec<Share>>,
    members: Vec<LeaseHandle>,
}

impl Fleet {
    /// Starts member `i` (pod `audit-export-i`) with a meter task on its lease.
    fn start(&mut self) {
        let i = self.members.len();
        let handle = client::spawn(
            ClientConfig {
                member: format!("audit-export-{i}"),
                ..self.config.clone()
            },
            self.demand.clone(),
        );
        let mut lease = handle.lease();
        let meter = self.meter.clone();
        let shares_tx = self.shares_tx.clone();
        tokio::spawn(async move {
            for _ in 0..MAX_CHANGES {
                let share = lease.borrow_and_update().share;
                let shares = {
                    let mut m = meter.lock().unwrap();
                    m.record(i, share);
                    m.shares.clone()
                };
                shares_tx.send_replace(shares);
                if lease.changed().await.is_err() {
                    break; // the member was released
                }
            }
        });
        self.members.push(handle);
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&[Share]) -> bool) {
        let mut rx = self.shares_tx.subscribe();
        let waited = tokio::time::timeout(TEST_TIMEOUT, rx.wait_for(|s| cond(s)))
            .await
            .map(|r| r.is_ok());
        assert!(
            matches!(waited, Ok(true)),
            "timed out waiting until {what}: {:?}",
            *self.shares_tx.borrow()
        );
    }
}

fn near(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[tokio::test]
async fn scaling_3_to_5_and_back_updates_the_deployment_and_expected_members_without_exceeding_the_budget(
) {
    // The embedded coordinator, served on a loopback port.
    let coord = Coordinator::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, coord.clone(), async move {
        let _ = stop_rx.await;
    }));

    let (ctx, api) = fixtures::context(coord.clone());
    let mut tc = tc_from_yaml(MINIMAL);
    tc.spec.replicas = 3;
    tc.spec.budget.messages_per_second = RATE;
    tc.spec.budget.max_in_flight = IN_FLIGHT as i32;
    tc.spec.budget.policy = BudgetPolicy::Equal;
    tc.spec.budget.lease_seconds = 1;
    tc.spec.budget.refresh_millis = 200;
    let u = Uris::of(&tc);
    let id = BudgetId::new("default", "audit-export");

    // Reconcile at 3 replicas.
    let steps = vec![
        Step::get_404(u.secret()),
        Step::echo(Method::POST, u.secret_create()),
        Step::get_404(u.deployment()),
        Step::echo(Method::PATCH, u.deployment_apply()),
        Step::get_404(u.pdb()),
        Step::status_apply(u.status_apply(), &tc),
    ];
    let (result, seen, api) = converse(api, steps, reconcile_one(&tc, &ctx)).await;
    result.unwrap();
    assert_eq!(seen[3].body["spec"]["replicas"], 3);
    assert_eq!(coord.snapshot(&id).unwrap().expected_members, 3);
    let secret: Secret = serde_json::from_value(seen[1].body.clone()).unwrap();
    let token = build::token_from_secret(&secret).unwrap();

    // Three replicas lease their shares.
    let (_demand_tx, demand) = watch::channel(Demand {
        demand: Share::new(1000.0, 100),
        observed_rate: None,
    });
    let mut fleet = Fleet {
        config: ClientConfig {
            base_url: format!("http://{addr}"),
            namespace: "default".into(),
            name: "audit-export".into(),
            token,
            member: String::new(),
        },
        demand,
        meter: Arc::default(),
        shares_tx: watch::channel(Vec::new()).0,
        members: Vec::new(),
    };
    for _ in 0..3 {
        fleet.start();
    }
    fleet
        .wait_for("3 members hold 10 msg/s each", |s| {
            s.len() == 3 && s.iter().all(|m| near(m.rate, 10.0) && m.in_flight == 2)
        })
        .await;

    // `kubectl scale tc/audit-export --replicas=5`: a new generation reconciled.
    let mut scaled = tc.clone();
    scaled.spec.replicas = 5;
    scaled.metadata.generation = Some(2);
    scaled.status = Some(serde_json::from_value(seen[5].body["status"].clone()).unwrap());
    let steps = vec![
        Step::get(u.secret(), seen[1].body.clone()),
        Step::get(u.deployment(), seen[3].body.clone()),
        Step::echo(Method::PATCH, u.deployment_apply()),
        Step::get_404(u.pdb()),
        Step::status_apply(u.status_apply(), &scaled),
    ];
    let (result, seen2, api) = converse(api, steps, reconcile_one(&scaled, &ctx)).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(10)));
    assert_eq!(seen2[2].body["spec"]["replicas"], 5);
    assert_eq!(seen2[4].body["status"]["observedGeneration"], 2);
    assert_eq!(coord.snapshot(&id).unwrap().expected_members, 5);

    // The running members shrink to budget / 5 before the new pods start...
    fleet
        .wait_for("the 3 running members shrink to 6 msg/s", |s| {
            s.iter().all(|m| near(m.rate, 6.0))
        })
        .await;
    // ...and the new pods join.
    for _ in 0..2 {
        fleet.start();
    }
    fleet
        .wait_for("5 members hold 6 msg/s each", |s| {
            s.len() == 5
                && s.iter().all(|m| near(m.rate, 6.0))
                && s.iter().map(|m| m.in_flight).sum::<u32>() == IN_FLIGHT
        })
        .await;
    let charged = coord.snapshot(&id).unwrap().charged;
    assert!(
        charged.rate <= RATE + 1e-9 && charged.in_flight <= IN_FLIGHT,
        "{charged:?}"
    );

    // And back to 3: the Deployment follows, the coordinator expects 3, the two
    // terminating pods release their leases and the others grow into the freed share.
    let mut down = scaled.clone();
    down.spec.replicas = 3;
    down.metadata.generation = Some(3);
    down.status = Some(serde_json::from_value(seen2[4].body["status"].clone()).unwrap());
    let steps = vec![
        Step::get(u.secret(), seen[1].body.clone()),
        Step::get(u.deployment(), seen2[2].body.clone()),
        Step::echo(Method::PATCH, u.deployment_apply()),
        Step::get_404(u.pdb()),
        Step::status_apply(u.status_apply(), &down),
    ];
    let (result, seen3, _) = converse(api, steps, reconcile_one(&down, &ctx)).await;
    result.unwrap();
    assert_eq!(seen3[2].body["spec"]["replicas"], 3);
    assert_eq!(coord.snapshot(&id).unwrap().expected_members, 3);
    for m in fleet.members.split_off(3) {
        m.release().await;
    }
    fleet
        .wait_for("the 3 remaining members grow back to 10 msg/s", |s| {
            s[..3]
                .iter()
                .all(|m| near(m.rate, 10.0) && m.in_flight == 2)
                && s[3..].iter().all(|m| m.rate == 0.0 && m.in_flight == 0)
        })
        .await;

    for m in std::mem::take(&mut fleet.members) {
        m.release().await;
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();

    let meter = fleet.meter.lock().unwrap();
    assert!(meter.changes > 10, "the meter saw the leases change");
    assert!(
        meter.max_rate <= RATE + 1e-9,
        "sum of member rates reached {} > {RATE}",
        meter.max_rate
    );
    assert!(
        meter.max_in_flight <= IN_FLIGHT,
        "sum of in-flight reached {} > {IN_FLIGHT}",
        meter.max_in_flight
    );
}

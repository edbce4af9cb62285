//! Lease refreshes per second through the real HTTP service.
//!
//! The coordinator runs on a single-threaded tokio runtime pinned to its own thread
//! (one core); the load runs on another runtime with `--connections` concurrent
//! keep-alive connections, each refreshing members in turn with honest holdings.
//!
//! ```text
//! cargo bench -p pacer-budget --bench refresh -- [--members 5000] [--budgets 50]
//!                                                [--connections 64] [--seconds 5]
//! ```
//!
//! Every member joins once first (not timed); then the steady state is measured.
//! Prints refreshes/s and latency percentiles (client-side, request sent to grant parsed).

use pacer_budget::service::{self, BudgetId, Coordinator};
use pacer_budget::{BudgetConfig, Grant, LeaseRequest, Policy, Share};
use std::time::{Duration, Instant};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let members = arg("--members", 5_000);
    let budgets = arg("--budgets", 50).max(1);
    let connections = arg("--connections", 64);
    let seconds = arg("--seconds", 5);

    let coord = Coordinator::new();
    for b in 0..budgets {
        let config = BudgetConfig::new(
            Share::new(10_000.0, 1_000),
            Policy::Demand,
            (members / budgets) as u32,
        );
        coord.upsert(
            BudgetId::new("bench", format!("b{b}")),
            config,
            TOKEN.into(),
        );
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let server_coord = coord.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            service::serve(listener, server_coord, std::future::pending())
                .await
                .unwrap();
        });
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (count, mut latencies) = rt.block_on(async move {
        let http = reqwest::Client::new();
        // Warm-up, not timed: every member joins once (joins recompute the split).
        for m in 0..members {
            let req = LeaseRequest {
                member: format!("member-{m}"),
                demand: Share::new(50.0, 5),
                holding: None,
                observed_rate: None,
                holding_fallback: None,
                holding_fallback_ms: None,
                incarnation: None,
            };
            let url = format!("http://{addr}/v1/budgets/bench/b{}/leases", m % budgets);
            let r = http
                .post(&url)
                .bearer_auth(TOKEN)
                .json(&req)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "warm-up refresh failed: {}",
                r.status()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let per_conn = members.div_ceil(connections).max(1);
        let mut tasks = Vec::new();
        for c in 0..connections {
            let http = http.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut holdings = vec![Share::ZERO; per_conn as usize];
                // Each member's first timed refresh reports a zero holding (warm-up
                // grants are not tracked): that changes what the ledger counts, not the
                // work a refresh does.
                let mut k = 0usize;
                while Instant::now() < deadline {
                    let m = c * per_conn + k as u64;
                    if m >= members {
                        k = 0;
                        continue;
                    }
                    let b = m % budgets;
                    let req = LeaseRequest {
                        member: format!("member-{m}"),
                        demand: Share::new(50.0, 5),
                        holding: Some(holdings[k]),
                        observed_rate: Some(10.0),
                        holding_fallback: None,
                        holding_fallback_ms: None,
                        incarnation: None,
                    };
                    let url = format!("http://{addr}/v1/budgets/bench/b{b}/leases");
                    let t = Instant::now();
                    let resp = http.post(&url).bearer_auth(TOKEN).json(&req).send().await;
                    let grant: Grant = match resp {
                        Ok(r) if r.status().is_success() => r.json().await.unwrap(),
                        other => panic!("refresh failed: {other:?}"),
                    };
                    lat.push(t.elapsed());
                    holdings[k] = grant.share();
                    k = (k + 1) % per_conn as usize;
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        (all.len(), all)
    });
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let rate = count as f64 / seconds as f64;
    println!("members={members} budgets={budgets} connections={connections} seconds={seconds}");
    println!(
        "refreshes={count} rate={rate:.0}/s p50={:.2}ms p99={:.2}ms max={:.2}ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    let snap_members: usize = coord
        .ids()
        .iter()
        .map(|id| coord.snapshot(id).unwrap().members.len())
        .sum();
    println!("members known to the coordinator: {snap_members}");
}

//! A fleet of real processes around one budget: a `pacer coordinator` child serving it
//! from a budgets file (so it can be killed, restarted and re-budgeted with SIGHUP), and
//! `pacer run` children leasing from it, each with its log in a file and its admin port
//! read back from that log. Every wait ends on an observed condition (a log line, the
//! replicas' `/metrics`, the coordinator's snapshot) and is bounded; every child is
//! killed and reaped on drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::process::{fast_group, logged_port, metric, scrape, spawn_logged, tmp, Pacer};
use crate::Kafka;

/// The bearer token of every fleet budget (the budgets file wants at least 16 bytes).
pub const TOKEN: &str = "fleet-test-token-0123456789abcdef";

/// One budget of the coordinator's file.
#[derive(Debug, Clone)]
pub struct BudgetSpec {
    /// `default/NAME`.
    pub name: String,
    pub rate: f64,
    pub in_flight: u32,
    /// `equal` or `demand`.
    pub policy: &'static str,
    pub lease_seconds: u32,
    pub refresh_millis: u32,
    pub fallback_seconds: Option<u32>,
    pub expected_members: u32,
}

impl BudgetSpec {
    /// A `demand` budget with 2 s leases refreshed every 200 ms.
    pub fn new(name: &str, rate: f64, in_flight: u32) -> BudgetSpec {
        BudgetSpec {
            name: name.to_string(),
            rate,
            in_flight,
            policy: "demand",
            lease_seconds: 2,
            refresh_millis: 200,
            fallback_seconds: None,
            expected_members: 1,
        }
    }

    /// The refresh interval.
    pub fn refresh(&self) -> Duration {
        Duration::from_millis(u64::from(self.refresh_millis))
    }

    fn yaml(&self) -> String {
        let fallback = self
            .fallback_seconds
            .map(|s| format!("    fallbackSeconds: {s}\n"))
            .unwrap_or_default();
        format!(
            "budgets:\n  - namespace: default\n    name: {}\n    messagesPerSecond: {}\n    maxInFlight: {}\n    policy: {}\n    leaseSeconds: {}\n    refreshMillis: {}\n    expectedMembers: {}\n{fallback}    token: {TOKEN}\n",
            self.name,
            self.rate,
            self.in_flight,
            self.policy,
            self.lease_seconds,
            self.refresh_millis,
            self.expected_members,
        )
    }
}

/// A `pacer coordinator` child serving one [`BudgetSpec`] from a file in its own
/// temporary folder, next to the token file the replicas read.
#[derive(Debug)]
pub struct Coordinator {
    pub spec: BudgetSpec,
    pub dir: PathBuf,
    pub token: PathBuf,
    pub port: u16,
    budgets: PathBuf,
    log: PathBuf,
    process: Option<Pacer>,
    /// "Budgets file reloaded" lines seen so far, to await the next one.
    reloads: usize,
}

impl Coordinator {
    /// Starts it on a port of its own choosing and waits until it listens.
    pub async fn start(folder: &str, spec: BudgetSpec) -> Coordinator {
        let dir = tmp(folder).with_extension("d");
        std::fs::create_dir_all(&dir).unwrap();
        let budgets = dir.join("budgets.yaml");
        std::fs::write(&budgets, spec.yaml()).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, TOKEN).unwrap();
        let mut c = Coordinator {
            spec,
            token,
            port: 0,
            budgets,
            log: dir.join("coordinator.log"),
            dir,
            process: None,
            reloads: 0,
        };
        c.spawn().await;
        c
    }

    /// Spawns the process on `self.port` (0: any) and reads back the port it bound.
    async fn spawn(&mut self) {
        let args: Vec<String> = [
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--budgets",
            &self.budgets.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.process = Some(spawn_logged(&args, &self.log));
        self.reloads = 0;
        self.port = logged_port(&self.log, "Coordinator listening").await;
    }

    /// The process id of the running coordinator (0 while it is down).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, |p| p.child.id())
    }

    /// The URL the replicas lease from.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and reaped: leases stay where they are until they run out.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGKILL);
            tokio::task::spawn_blocking(move || p.wait(Duration::from_secs(10)))
                .await
                .unwrap();
        }
    }

    /// A new process on the same port (its ledger starts in learning mode).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Rewrites the budgets file with `change` applied and sends SIGHUP; returns once
    /// the coordinator logged the reload.
    pub async fn reload(&mut self, change: impl FnOnce(&mut BudgetSpec)) {
        change(&mut self.spec);
        std::fs::write(&self.budgets, self.spec.yaml()).unwrap();
        self.process
            .as_ref()
            .expect("a running coordinator")
            .signal(libc::SIGHUP);
        let want = self.reloads + 1;
        let log = self.log.clone();
        crate::process::wait_for("the budgets file reload", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("Budgets file reloaded")
                .count()
                >= want
        })
        .await;
        self.reloads = want;
    }

    /// The budget as the coordinator sees it (`GET /v1/budgets/default/NAME`).
    pub async fn snapshot(&self) -> Option<pacer_budget::Snapshot> {
        pacer_budget::client::snapshot(&self.url(), "default", &self.spec.name, TOKEN).await
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `pacer run` child of a [`Fleet`].
#[derive(Debug)]
pub struct Replica {
    pub member: String,
    pub admin_port: u16,
    pub log: PathBuf,
    pub process: Pacer,
}

/// One replica as its `/metrics` shows it (`None`: not scraped or not exposed).
#[derive(Debug, Default, Clone)]
pub struct ReplicaView {
    pub member: String,
    pub granted_rate: Option<f64>,
    pub granted_in_flight: Option<f64>,
    pub assigned_partitions: Option<f64>,
    pub buffer_messages: Option<f64>,
    pub fallback: Option<f64>,
}

/// The fleet at one instant: each replica's metrics and the coordinator's snapshot.
#[derive(Debug)]
pub struct FleetView {
    pub replicas: Vec<ReplicaView>,
    pub budget: Option<pacer_budget::Snapshot>,
}

impl FleetView {
    /// Sum of the replicas' granted rates, if every replica answered.
    pub fn granted_rate(&self) -> Option<f64> {
        self.replicas.iter().map(|r| r.granted_rate).sum()
    }

    /// Sum of the replicas' granted in-flight slots, if every replica answered.
    pub fn granted_in_flight(&self) -> Option<f64> {
        self.replicas.iter().map(|r| r.granted_in_flight).sum()
    }

    /// True once the group's assignment is complete: every replica holds at least one
    /// partition and together they hold all `partitions`.
    pub fn assigned_all(&self, partitions: usize) -> bool {
        let counts: Option<Vec<f64>> = self
            .replicas
            .iter()
            .map(|r| r.assigned_partitions)
            .collect();
        counts.is_some_and(|c| {
            c.iter().all(|n| *n >= 1.0) && c.iter().sum::<f64>() == partitions as f64
        })
    }

    /// True when every replica answered and none runs on its fallback share.
    pub fn all_leased(&self) -> bool {
        self.replicas.iter().all(|r| r.fallback == Some(0.0))
    }

    /// The live members in the coordinator's snapshot.
    pub fn live_members(&self) -> Vec<&str> {
        self.budget
            .iter()
            .flat_map(|s| &s.members)
            .filter(|m| m.state == pacer_budget::MemberState::Live)
            .map(|m| m.member.as_str())
            .collect()
    }

    /// Every replica leased, the grants adding up to `rate` (within 1 %), and exactly
    /// these replicas live at the coordinator: a settled fleet.
    pub fn settled_at(&self, rate: f64) -> bool {
        self.all_leased()
            && self.live_members().len() == self.replicas.len()
            && self
                .granted_rate()
                .is_some_and(|r| (r - rate).abs() <= 0.01 * rate)
    }
}

/// `pacer run` replicas of one topic and group, leasing from one [`Coordinator`] and
/// delivering to one sink.
#[derive(Debug)]
pub struct Fleet {
    pub coordinator: Coordinator,
    pub replicas: Vec<Replica>,
    bootstrap: String,
    topic: String,
    sink: String,
    /// Members started so far, for unique names.
    started: usize,
    /// Logs of the replicas stopped or killed, kept for [`Fleet::explain`] until the
    /// fleet is dropped.
    departed: Vec<(String, PathBuf)>,
}

impl Fleet {
    pub fn new(kafka: &Kafka<'_>, topic: &str, sink_url: &str, coordinator: Coordinator) -> Fleet {
        Fleet {
            coordinator,
            replicas: Vec::new(),
            bootstrap: kafka.bootstrap.clone(),
            topic: topic.to_string(),
            sink: sink_url.to_string(),
            started: 0,
            departed: Vec::new(),
        }
    }

    fn args(&self, member: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--bootstrap-servers",
            &self.bootstrap,
            "--topic",
            &self.topic,
            "--group-id",
            &format!("g-{}", self.topic),
            "--sink",
            &self.sink,
            "--admin-addr",
            "127.0.0.1:0",
            "--coordinator",
            &self.coordinator.url(),
            "--budget",
            &format!("default/{}", self.coordinator.spec.name),
            "--token-file",
            &self.coordinator.token.display().to_string(),
            "--member",
            member,
            "--shutdown-grace",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in fast_group() {
            args.push("--kafka-config".into());
            args.push(format!("{k}={v}"));
        }
        args
    }

    /// Starts `n` more replicas (`r0`, `r1`... in start order) and waits until each
    /// serves its admin endpoints.
    pub async fn add(&mut self, n: usize) {
        for _ in 0..n {
            let member = format!("r{}", self.started);
            self.started += 1;
            let log = tmp(&format!("fleet-{member}"));
            let process = spawn_logged(&self.args(&member), &log);
            let admin_port = logged_port(&log, "Admin HTTP listening").await;
            self.replicas.push(Replica {
                member,
                admin_port,
                log,
                process,
            });
        }
    }

    /// Stops replica `i` with SIGTERM (it drains and releases its lease) and returns its
    /// exit code, `None` if it did not exit within 30 s.
    pub async fn stop(&mut self, i: usize) -> Option<i32> {
        let mut r = self.replicas.remove(i);
        r.process.signal(libc::SIGTERM);
        self.departed.push((r.member.clone(), r.log.clone()));
        let code = tokio::task::spawn_blocking(move || r.process.wait(Duration::from_secs(30)))
            .await
            .unwrap();
        code
    }

    /// Kills replica `i` with SIGKILL: no drain, no release, no commit of what it had in
    /// flight. Returns its member name.
    pub async fn kill(&mut self, i: usize) -> String {
        let mut r = self.replicas.remove(i);
        r.process.signal(libc::SIGKILL);
        let member = r.member.clone();
        self.departed.push((r.member.clone(), r.log.clone()));
        tokio::task::spawn_blocking(move || {
            r.process.wait(Duration::from_secs(10));
        })
        .await
        .unwrap();
        member
    }

    /// Every replica's metrics and the coordinator's snapshot, now.
    pub async fn view(&self) -> FleetView {
        let mut replicas = Vec::new();
        for r in &self.replicas {
            let mut v = ReplicaView {
                member: r.member.clone(),
                ..ReplicaView::default()
            };
            if let Some(m) = scrape(r.admin_port).await {
                v.granted_rate = metric(&m, "pacer_granted_rate");
                v.granted_in_flight = metric(&m, "pacer_granted_in_flight");
                v.assigned_partitions = metric(&m, "pacer_assigned_partitions");
                v.buffer_messages = metric(&m, "pacer_buffer_messages");
                v.fallback = metric(&m, "pacer_fallback");
            }
            replicas.push(v);
        }
        FleetView {
            replicas,
            budget: self.coordinator.snapshot().await,
        }
    }

    /// Polls the fleet every 100 ms until `cond` holds and returns that view; fails
    /// after `timeout`, showing the last view.
    pub async fn await_view(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&FleetView) -> bool,
    ) -> FleetView {
        let until = Instant::now() + timeout;
        loop {
            let view = self.view().await;
            if cond(&view) {
                return view;
            }
            assert!(
                Instant::now() < until,
                "timed out after {timeout:?} waiting for {what}; last seen: {view:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every replica's log, for a failure message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let text = std::fs::read_to_string(&r.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ---\n", r.member));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Fleet {
    /// Every replica's log lines (those departed too) that are warnings or errors, or
    /// that name one of `partitions` (`topic/3` in assignment, revoke and commit lines):
    /// what a test prints when it finds a duplicate.
    pub fn explain(&self, partitions: &[i32]) -> String {
        let names: Vec<String> = partitions
            .iter()
            .map(|p| format!("{}/{p}", self.topic))
            .collect();
        let names_one = |l: &str| {
            names.iter().any(|n| {
                l.match_indices(n.as_str())
                    .any(|(at, _)| !l[at + n.len()..].starts_with(|c: char| c.is_ascii_digit()))
            })
        };
        let mut out = String::new();
        let logs = self
            .departed
            .iter()
            .map(|(m, l)| (m, l))
            .chain(self.replicas.iter().map(|r| (&r.member, &r.log)));
        for (member, log) in logs {
            out.push_str(&format!("--- {member} ---\n"));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for l in text.lines() {
                if l.contains("WARN") || l.contains("ERROR") || names_one(l) {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for r in self.replicas.drain(..) {
            drop(r.process);
            let _ = std::fs::remove_file(&r.log);
        }
        for (_, log) in &self.departed {
            let _ = std::fs::remove_file(log);
        }
    }
}

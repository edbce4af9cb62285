//! The demo's fleet: a `pacer coordinator` and `pacer run` replicas, child processes of
//! this same binary, each logging to a file in the demo's folder; the ports they bound
//! (port 0) are read back from those logs. Every child is killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DemoError;

pub const TOKEN: &str = "pacer-demo-token-0123456789abcdef";
pub const NAMESPACE: &str = "demo";
pub const NAME: &str = "demo";

/// A child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: &Path) -> Result<Proc, DemoError> {
        let exe = std::env::current_exe().map_err(DemoError::Spawn)?;
        let file = std::fs::File::create(log).map_err(DemoError::Spawn)?;
        let child = Command::new(exe)
            .args(args)
            .env("PACER_LOG", "info,rdkafka=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(DemoError::Spawn)?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Sends `sig` with `kill(1)` (this workspace forbids unsafe code).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status();
    }

    /// Waits up to `within` for the exit; its code, `None` if killed or still running.
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The port of the first log line holding `marker` and `127.0.0.1:PORT`, within 20 s.
    async fn port(&mut self, marker: &str) -> Result<u16, DemoError> {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let port = text
                .lines()
                .find(|l| l.contains(marker))
                .and_then(|l| l.split("127.0.0.1:").nth(1))
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse().ok());
            if let Some(p) = port {
                return Ok(p);
            }
            if Instant::now() >= until || matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(DemoError::Child {
                    what: marker.to_string(),
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The budget the coordinator serves, as its budgets file says it.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub rate: f64,
    pub in_flight: u32,
    pub expected: u32,
}

/// Short leases, refreshes and fallback window: the story moves in seconds.
pub const LEASE_SECONDS: u64 = 2;
pub const REFRESH_MILLIS: u64 = 250;
pub const FALLBACK_SECONDS: u64 = 2;

/// The `pacer coordinator` child, restartable on its port.
#[derive(Debug)]
pub struct Coordinator {
    dir: PathBuf,
    pub port: u16,
    pub budget: Budget,
    proc: Option<Proc>,
    starts: u32,
}

impl Coordinator {
    pub async fn start(dir: &Path, budget: Budget) -> Result<Coordinator, DemoError> {
        std::fs::write(dir.join("token"), TOKEN).map_err(DemoError::Spawn)?;
        let mut c = Coordinator {
            dir: dir.to_path_buf(),
            port: 0,
            budget,
            proc: None,
            starts: 0,
        };
        c.write_file()?;
        c.spawn().await?;
        Ok(c)
    }

    fn write_file(&self) -> Result<(), DemoError> {
        let b = self.budget;
        let text = format!(
            "budgets:\n  - namespace: {NAMESPACE}\n    name: {NAME}\n    messagesPerSecond: {}\n    maxInFlight: {}\n    policy: demand\n    leaseSeconds: {LEASE_SECONDS}\n    refreshMillis: {REFRESH_MILLIS}\n    fallbackSeconds: {FALLBACK_SECONDS}\n    expectedMembers: {}\n    token: {TOKEN}\n",
            b.rate, b.in_flight, b.expected
        );
        std::fs::write(self.dir.join("budgets.yaml"), text).map_err(DemoError::Spawn)
    }

    async fn spawn(&mut self) -> Result<(), DemoError> {
        self.starts += 1;
        let args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--budgets".into(),
            self.dir.join("budgets.yaml").display().to_string(),
        ];
        let log = self.dir.join(format!("coordinator-{}.log", self.starts));
        let mut p = Proc::spawn(&args, &log)?;
        self.port = p.port("Coordinator listening").await?;
        self.proc = Some(p);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then a new process on the same port (its ledger learns again).
    pub async fn restart(&mut self) -> Result<(), DemoError> {
        if let Some(mut p) = self.proc.take() {
            p.signal("KILL");
            p.wait(Duration::from_secs(10)).await;
        }
        self.spawn().await
    }

    /// Rewrites the budgets file and sends SIGHUP; returns once the coordinator serves
    /// the new budget (at most 10 s).
    pub async fn set(&mut self, budget: Budget) -> Result<(), DemoError> {
        self.budget = budget;
        self.write_file()?;
        if let Some(p) = &self.proc {
            p.signal("HUP");
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Some(s) = self.snapshot().await {
                if s.capacity.rate == budget.rate && s.expected_members == budget.expected {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(DemoError::Child {
            what: "the reloaded budget".into(),
            log: self
                .proc
                .as_ref()
                .map(|p| p.log.clone())
                .unwrap_or_default(),
        })
    }

    pub async fn snapshot(&self) -> Option<pacer_budget::Snapshot> {
        pacer_budget::client::snapshot(&self.url(), NAMESPACE, NAME, TOKEN).await
    }
}

/// A `pacer run` child.
#[derive(Debug)]
pub struct Replica {
    pub member: String,
    pub admin_port: u16,
    pub proc: Proc,
}

/// What `pacer run` needs besides its member name.
#[derive(Debug, Clone)]
pub struct RunTarget {
    pub bootstrap: String,
    pub topic: String,
    pub sink: String,
    pub coordinator: String,
    pub dir: PathBuf,
}

impl Replica {
    pub async fn start(t: &RunTarget, member: &str) -> Result<Replica, DemoError> {
        let mut args: Vec<String> = [
            "run",
            "--bootstrap-servers",
            &t.bootstrap,
            "--topic",
            &t.topic,
            "--group-id",
            "demo",
            "--sink",
            &t.sink,
            "--admin-addr",
            "127.0.0.1:0",
            "--coordinator",
            &t.coordinator,
            "--budget",
            &format!("{NAMESPACE}/{NAME}"),
            "--token-file",
            &t.dir.join("token").display().to_string(),
            "--member",
            member,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for kv in ["session.timeout.ms=6000", "heartbeat.interval.ms=500"] {
            args.push("--kafka-config".into());
            args.push(kv.into());
        }
        let mut proc = Proc::spawn(&args, &t.dir.join(format!("{member}.log")))?;
        let admin_port = proc.port("Admin HTTP listening").await?;
        Ok(Replica {
            member: member.to_string(),
            admin_port,
            proc,
        })
    }

    /// (granted rate, messages acked so far) from its `/metrics`.
    pub async fn scrape(&self, client: &reqwest::Client) -> Option<(f64, f64)> {
        let text = client
            .get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        Some((
            value("pacer_granted_rate").unwrap_or(0.0),
            value("pacer_messages_total{outcome=\"acked\"}").unwrap_or(0.0),
        ))
    }
}

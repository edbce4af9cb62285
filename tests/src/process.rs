//! `pacer` child processes (always killed and reaped on drop), their admin endpoints and
//! logs, and the bounded wait every test uses. Shared by the runtime's tests and the
//! fleet tests.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use crate::apache::free_port;

/// The `pacer` binary of this build: next to the test executable's `deps/` folder
/// (`target/<profile>/pacer`). Cargo builds it for the runtime's integration tests; the
/// test command builds it (`cargo build --bins`) before any test runs.
pub fn pacer_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("pacer");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p pacer-runtime --bins` first",
        bin.display()
    );
    bin
}

/// Polls `cond` every 20 ms until it holds, failing the test after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Consumer settings that make group changes quick on the mock broker.
pub fn fast_group() -> Vec<(String, String)> {
    [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "300"),
        ("auto.commit.interval.ms", "200"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A `pacer` child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Pacer {
    pub child: Child,
}

impl Pacer {
    pub fn spawn(args: &[String]) -> Pacer {
        let child = Command::new(pacer_bin())
            .args(args)
            .env("PACER_LOG", "info,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pacer");
        Pacer { child }
    }

    /// Sends signal number `sig` (`libc::SIGTERM`...) with `kill(1)`: unsafe code is
    /// forbidden in this workspace.
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::apache::rss_kib_of(self.child.id())
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one metric value from a Prometheus text exposition.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Lets `d` pass from `from`: the span over which a test counts deliveries. A fixed
/// window is the measurement itself, not a stand-in for a condition.
pub async fn measure_until(from: Instant, d: Duration) {
    tokio::time::sleep_until((from + d).into()).await;
}

/// Fetches `/metrics` of a child's admin port.
pub async fn scrape(port: u16) -> Option<String> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        // A hung replica must fail the wait around this, not hang it.
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The admin port a child logged ("Admin HTTP listening").
pub async fn admin_port_of(p: &mut Pacer, log: &std::path::Path) -> u16 {
    let _ = p;
    logged_port(log, "Admin HTTP listening").await
}

/// The port in the first line of `log` that contains `marker` and `127.0.0.1:PORT`
/// (a child binding port 0 logs what it bound); waits up to 20 s for it.
pub async fn logged_port(log: &std::path::Path, marker: &str) -> u16 {
    let mut port = None;
    wait_for(
        &format!("\"{marker}\" with a port in {}", log.display()),
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            port = text
                .lines()
                .find(|l| l.contains(marker))
                .and_then(|l| l.split("127.0.0.1:").nth(1))
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse().ok());
            port.is_some()
        },
    )
    .await;
    port.unwrap()
}

/// A `pacer` child whose log goes to `log`.
pub fn spawn_logged(args: &[String], log: &std::path::Path) -> Pacer {
    let file = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(pacer_bin())
        .args(args)
        .env("PACER_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn pacer");
    Pacer { child }
}

/// A temporary log path, unique in this process.
///
/// Unique per call: under `cargo test` the mock-cluster and Apache Kafka variants of a
/// scenario run side by side in one process, and a name shared by the two let one
/// variant read (and remove) the other's log.
pub fn tmp(name: &str) -> std::path::PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("pacer-test-{}-{n}-{name}.log", std::process::id()))
}

//! `pacer coordinator`: the real binary serving a budgets file, reloaded on SIGHUP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn budgets(rate: u32, in_flight: u32) -> String {
    format!(
        "budgets:\n  - namespace: default\n    name: orders\n    messagesPerSecond: {rate}\n    maxInFlight: {in_flight}\n    expectedMembers: 2\n    token: {TOKEN}\n"
    )
}

/// Kills and reaps the child on every exit path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Starts the coordinator on port 0 and reads the bound address from its log; the
/// receiver gets every later log line.
fn start(file: &std::path::Path) -> (Reaped, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--budgets"])
        .arg(file)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Reaped(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = wait_line(&rx, "addr=");
    let addr = addr.split("addr=").nth(1).unwrap();
    let addr: String = addr.chars().take_while(|c| !c.is_whitespace()).collect();
    (child, format!("http://{addr}"), rx)
}

/// The first log line containing `needle`, waiting at most 20 s.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line with {needle:?}: {e}"),
        }
    }
}

async fn capacity(url: &str) -> pacer_budget::Share {
    let snap: pacer_budget::Snapshot = reqwest::Client::new()
        .get(format!("{url}/v1/budgets/default/orders"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    snap.capacity
}

#[tokio::test]
async fn coordinator_serves_the_file_and_applies_an_edit_on_sighup() {
    let dir = std::env::temp_dir().join(format!("pacer-coord-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("budgets.yaml");
    std::fs::write(&file, budgets(100, 10)).unwrap();
    let (mut child, url, log) = start(&file);
    assert_eq!(capacity(&url).await, pacer_budget::Share::new(100.0, 10));

    std::fs::write(&file, budgets(40, 4)).unwrap();
    signal(&child.0, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while capacity(&url).await != pacer_budget::Share::new(40.0, 4) {
        assert!(Instant::now() < deadline, "SIGHUP reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken edit is refused and the running budget kept.
    std::fs::write(&file, budgets(0, 4)).unwrap();
    signal(&child.0, "-HUP");
    let line = wait_line(&log, "reload failed");
    assert!(line.contains("messagesPerSecond"), "{line}");
    assert_eq!(capacity(&url).await, pacer_budget::Share::new(40.0, 4));

    signal(&child.0, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "coordinator ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn coordinator_refuses_a_bad_budgets_file_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("pacer-coord-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("budgets.yaml");
    std::fs::write(&file, budgets(100, 0)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--budgets"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("budgets[0].maxInFlight: 0 is out of range, must be 1 to 100000"),
        "stderr: {stderr}"
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--budgets"])
        .arg(dir.join("nope.yaml"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read budgets file"));
    let _ = std::fs::remove_dir_all(&dir);
}

//! Apache Kafka itself, as a child process: a single-node KRaft broker (combined broker
//! and controller) on free loopback ports, with a fresh log directory.
//!
//! The jars come from `scripts/kafka-jars.sh` (Maven Central, cached in `.tools/`, the
//! version pinned there); `PACER_KAFKA_JARS` names their folder, or the script is run
//! to find it. A missing Java or Maven fails the test with what to install: a test that
//! claims to have run on Kafka never silently runs on nothing.
//!
//! Lifetime: `java` runs under a small `sh` that waits on a pipe from this process.
//! Dropping the [`ApacheKafka`] closes the pipe; so does this process dying in any way
//! (a panic, nextest's timeout kill, SIGKILL), and the shell then kills the broker and
//! removes its data. No broker outlives the test that started it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// Longest a broker may take to answer metadata after `java` starts. Seen here: 4-5 s
/// with the other core busy compiling; a loaded 2-core CI machine gets 12 times that.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Broker settings besides the listeners and the log directory. Each is here to make a
/// one-node broker behave, or to make group changes take seconds instead of minutes.
const SETTINGS: &[(&str, &str)] = &[
    ("process.roles", "broker,controller"),
    ("node.id", "1"),
    ("controller.listener.names", "CONTROLLER"),
    ("inter.broker.listener.name", "PLAINTEXT"),
    (
        "listener.security.protocol.map",
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    ),
    // One node: internal topics with one replica (the defaults of 3 would never be
    // created), and one offsets partition so the group coordinator is ready at once.
    ("offsets.topic.replication.factor", "1"),
    ("offsets.topic.num.partitions", "1"),
    ("transaction.state.log.replication.factor", "1"),
    ("transaction.state.log.min.isr", "1"),
    ("share.coordinator.state.topic.replication.factor", "1"),
    ("share.coordinator.state.topic.min.isr", "1"),
    // The classic protocol waits 3 s for more members before the first assignment.
    ("group.initial.rebalance.delay.ms", "0"),
    // KIP-848 (`group.protocol=consumer`) groups: the broker, not the client, sets the
    // heartbeat and session times. The defaults (5 s, 45 s) make a crashed member's
    // partitions wait 45 s; these match the classic settings the tests use
    // (`heartbeat.interval.ms=300`, `session.timeout.ms=6000`).
    ("group.consumer.min.heartbeat.interval.ms", "300"),
    ("group.consumer.heartbeat.interval.ms", "300"),
    ("group.consumer.min.session.timeout.ms", "6000"),
    ("group.consumer.session.timeout.ms", "6000"),
    // Records up to 2 MB (the default, 1 MiB + 12 bytes, refuses a 1 MiB value once
    // the batch header is added); the test producers allow as much.
    ("message.max.bytes", "2000000"),
    // Topics come from the tests; a typo must not create one.
    ("auto.create.topics.enable", "false"),
    ("num.partitions", "1"),
    // Small segments and no fsync pressure: tests write hundreds of MB at most.
    ("log.flush.interval.messages", "9223372036854775807"),
];

static JARS: OnceLock<PathBuf> = OnceLock::new();

/// The folder of broker jars (fetched once per machine).
pub fn jars() -> &'static Path {
    JARS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PACER_KAFKA_JARS") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-jars.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (Kafka's jars come from Maven Central; Java 17+ and Maven must be installed)",
            script.display()
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A running Apache Kafka broker, killed and its data removed on drop.
#[derive(Debug)]
pub struct ApacheKafka {
    /// `host:port` of the PLAINTEXT listener.
    pub bootstrap: String,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    shell: Option<(Child, ChildStdin)>,
    /// How long the last start took, from `java` launched to metadata answered.
    pub started_in: Duration,
}

impl ApacheKafka {
    /// Formats a fresh log directory and starts a broker on free ports.
    pub fn start() -> ApacheKafka {
        // Free ports are found by binding and releasing: another process may take one in
        // between, so a broker that fails to bind is started again on new ports.
        let mut last = String::new();
        for _ in 0..3 {
            let mut k = ApacheKafka::prepare();
            match k.launch() {
                Ok(()) => return k,
                Err(log) if log.contains("Address already in use") => last = log,
                Err(log) => panic!("Apache Kafka did not start:\n{log}"),
            }
        }
        panic!("Apache Kafka could not bind free ports three times:\n{last}");
    }

    /// A broker on free ports with a formatted log directory, not started yet: its
    /// address is known, so a client can be pointed at it before it answers (start it
    /// with [`ApacheKafka::restart`]).
    pub fn prepare() -> ApacheKafka {
        let dir =
            std::env::temp_dir().join(format!("pacer-kafka-{}-{}", std::process::id(), next_id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("broker dir");
        let port = free_port();
        let k = ApacheKafka {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            controller_port: free_port(),
            dir,
            shell: None,
            started_in: Duration::ZERO,
        };
        k.write_config();
        k.format();
        k
    }

    /// Stops the broker cleanly (SIGTERM: controlled shutdown, logs flushed), keeping its
    /// port and data for [`ApacheKafka::restart`].
    pub fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.shell.take() {
            let _ = writeln!(stdin, "term");
            drop(stdin);
            let until = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker (again) on its ports and data.
    pub fn restart(&mut self) {
        assert!(self.shell.is_none(), "restart of a running broker");
        if let Err(log) = self.launch() {
            panic!("Apache Kafka did not restart:\n{log}");
        }
    }

    /// Resident memory of the broker's JVM in KiB (from /proc), if it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = std::fs::read_to_string(self.dir.join("java.pid")).ok()?;
        rss_kib_of(pid.trim().parse().ok()?)
    }

    /// The broker's folder: config, `broker.log`, data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn write_config(&self) {
        let mut props = String::new();
        for (k, v) in SETTINGS {
            props.push_str(&format!("{k}={v}\n"));
        }
        let (p, c) = (self.port, self.controller_port);
        props.push_str(&format!(
            "controller.quorum.voters=1@127.0.0.1:{c}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{p}\n\
             log.dirs={}\n",
            self.dir.join("data").display()
        ));
        std::fs::write(self.dir.join("server.properties"), props).expect("server.properties");
    }

    fn java(&self) -> Command {
        let java = std::env::var_os("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .filter(|j| j.exists())
            .unwrap_or_else(|| PathBuf::from("java"));
        let mut cmd = Command::new(java);
        cmd.arg("-cp").arg(jars().join("*"));
        cmd
    }

    fn format(&self) {
        // A cluster id is 16 random bytes, URL-safe base64 without padding.
        self.format_with(&{
            use std::hash::{BuildHasher, Hasher};
            let mut bytes = Vec::with_capacity(16);
            for i in 0..2u64 {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(i ^ std::process::id() as u64);
                bytes.extend_from_slice(&h.finish().to_le_bytes());
            }
            base64_url(&bytes)
        });
    }

    fn format_with(&self, id: &str) {
        let out = self
            .java()
            // `--cluster-id=ID`, not `-t ID`: an id may start with '-' (URL-safe base64),
            // which the tool's argument parser then takes for an option (seen in CI).
            .args(["kafka.tools.StorageTool", "format"])
            .arg(format!("--cluster-id={id}"))
            .arg("--config")
            .arg(self.dir.join("server.properties"))
            .output()
            .expect("java (Kafka 4.x needs Java 17 or newer on PATH or in JAVA_HOME)");
        assert!(
            out.status.success(),
            "kafka.tools.StorageTool format failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `java` under the watching shell and waits until metadata answers. On
    /// failure returns the broker's log.
    fn launch(&mut self) -> Result<(), String> {
        let java = self.java();
        let mut argv: Vec<String> = vec![java.get_program().to_string_lossy().into_owned()];
        argv.extend(java.get_args().map(|a| a.to_string_lossy().into_owned()));
        // Heap: the broker needs ~300 MB resident under the tests' load; 512 MB caps it.
        argv.splice(1..1, ["-Xmx512m".to_string(), "-Xms128m".to_string()]);
        argv.push("kafka.Kafka".into());
        argv.push(self.dir.join("server.properties").display().to_string());
        // The shell runs java in the background and reads one line from our pipe:
        // "term" stops it cleanly and keeps the data; end of file (dropped, or this
        // process died) kills it and removes the data.
        let script = r#"
            "$@" </dev/null >>"$PACER_KAFKA_DIR/broker.log" 2>&1 &
            j=$!
            echo "$j" > "$PACER_KAFKA_DIR/java.pid"
            read -r cmd
            if [ "$cmd" = term ]; then kill -TERM "$j"; wait "$j"; exit 0; fi
            kill -KILL "$j" 2>/dev/null; { wait "$j"; } 2>/dev/null
            rm -rf "$PACER_KAFKA_DIR"
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("kafka")
            .args(&argv)
            .env("PACER_KAFKA_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Null, not inherited: the shell outlives this process when it is held in a
            // static (one per test binary) and cleans up after it; an inherited stderr
            // would keep the test's output open meanwhile (nextest: leaked handles).
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for the broker");
        let stdin = child.stdin.take().expect("broker pipe");
        let launched = Instant::now();
        self.shell = Some((child, stdin));
        loop {
            if self.answers_metadata() {
                self.started_in = launched.elapsed();
                return Ok(());
            }
            let exited = match &mut self.shell {
                Some((c, _)) => c.try_wait().ok().flatten().is_some(),
                None => true,
            };
            let log = || std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if exited || java_exited(&log()) {
                let text = log();
                self.stop();
                return Err(tail(&text, 60));
            }
            if launched.elapsed() > START_TIMEOUT {
                let text = log();
                self.stop();
                return Err(format!(
                    "no metadata answer within {START_TIMEOUT:?}; log:\n{}",
                    tail(&text, 60)
                ));
            }
            // Refused connections fail at once: probe at most ten times a second.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One metadata request with a short timeout (also the readiness probe's pace).
    fn answers_metadata(&self) -> bool {
        let c: BaseConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "0")
            .create()
        {
            Ok(c) => c,
            Err(_) => return false,
        };
        c.fetch_metadata(None, Duration::from_millis(500))
            .is_ok_and(|m| !m.brokers().is_empty())
    }
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.shell.take() {
            drop(stdin);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kafka logs a fatal start-up error and may keep the JVM alive a moment.
fn java_exited(log: &str) -> bool {
    log.contains("Exiting Kafka") || log.contains("Address already in use")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn next_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Resident memory of process `pid` in KiB, from /proc.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A free local port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_id_starting_with_a_dash_is_accepted_by_the_storage_tool() {
        let k = ApacheKafka::prepare();
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = std::fs::remove_dir_all(k.dir.join("data"));
            k.format_with("-AbCdEfGhIjKlMnOpQrStU");
        }));
        assert!(again.is_ok(), "an id starting with '-' was refused");
    }

    #[test]
    fn a_cluster_id_is_22_url_safe_base64_characters() {
        let id = base64_url(&[0xfb; 16]);
        assert_eq!(id.len(), 22);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(base64_url(b"Man"), "TWFu");
        assert_eq!(base64_url(b"Ma"), "TWE");
    }
}

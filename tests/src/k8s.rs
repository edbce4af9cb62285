//! A Kubernetes control plane without a kubelet, as child processes: etcd,
//! kube-apiserver and (when it was built) kube-controller-manager on free loopback
//! ports, the way controller-runtime's envtest runs one.
//!
//! The binaries come from `scripts/control-plane.sh` (built from Go modules, cached in
//! `.tools/`, Kubernetes' version pinned there); `PACER_K8S_BIN` names their folder, or
//! the script is run to find it. kubectl and helm come from `scripts/kube-tools.sh`
//! (`PACER_KUBE_TOOLS`). A missing tool fails the test with what to install: a test
//! that claims to have run on a real API server never silently runs on nothing.
//!
//! The API server authenticates bearer tokens from a token file (an admin in
//! `system:masters`) and service-account tokens signed with a key pair made here, and
//! authorizes with RBAC only, so a token of a ServiceAccount has exactly the
//! permissions its (Cluster)RoleBindings grant. Every request of a ServiceAccount
//! outside `kube-system` (a workload under test, not the controller-manager) goes to an
//! audit log ([`ControlPlane::audit_log`]), so a test can list what a client really did.
//!
//! Lifetime: every process runs under one small `sh` that reads commands from a pipe
//! held by this process. Dropping the [`ControlPlane`] closes the pipe; so does this
//! process dying in any way (a panic, nextest's timeout kill, SIGKILL); the shell then
//! kills every component and removes the data. Nothing outlives the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::apache::free_port;

/// Starts tried before giving up when a component's port was taken meanwhile.
const START_ATTEMPTS: u32 = 3;
/// Longest the API server may take to answer `/readyz` (seen here: a few seconds on an
/// idle machine; a loaded 2-core CI machine gets much more).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What the audit log keeps: requests of ServiceAccounts outside `kube-system` (the
/// controller-manager's controllers run as ServiceAccounts there), at `Metadata` level.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    userGroups: [\"system:serviceaccounts:kube-system\"]
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

static BIN: OnceLock<PathBuf> = OnceLock::new();
static TOOLS: OnceLock<PathBuf> = OnceLock::new();

/// The folder holding `etcd`, `kube-apiserver` and maybe `kube-controller-manager`.
pub fn bin_dir() -> &'static Path {
    BIN.get_or_init(|| script_output("PACER_K8S_BIN", "control-plane.sh"))
}

/// The folder holding `kubectl` and `helm`.
pub fn tools_dir() -> &'static Path {
    TOOLS.get_or_init(|| script_output("PACER_KUBE_TOOLS", "kube-tools.sh"))
}

/// `$var`, or the folder `scripts/<script>` prints.
fn script_output(var: &str, script: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(var) {
        return PathBuf::from(dir);
    }
    let path = repo_root().join("scripts").join(script);
    let out = Command::new(&path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed (see its output above)",
        path.display()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A running control plane, killed and its data removed on drop.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// A kubeconfig for the admin (`system:masters`), for kubectl, helm and kube-rs.
    pub kubeconfig: PathBuf,
    /// Whether kube-controller-manager runs (Deployments become Pods, owned objects
    /// are garbage-collected, namespaces finish terminating).
    pub controllers: bool,
    /// How long the API server took from launch to `/readyz`.
    pub started_in: Duration,
    dir: PathBuf,
    shell: Option<(Child, ChildStdin)>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (if built) kube-controller-manager, and waits
    /// until the API server is ready and the controllers have made the `default`
    /// ServiceAccount.
    ///
    /// A port picked free can be taken by another process before the component binds
    /// it (seen: kube-apiserver's `bind: address already in use` while other tests ran
    /// beside it); such a start is given up at once and tried again on new ports, at
    /// most [`START_ATTEMPTS`] times, as the Kafka harness does.
    pub fn start() -> ControlPlane {
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start() {
                Ok(cp) => return cp,
                Err(log) => {
                    eprintln!(
                        "control plane start {attempt}: a port was taken; again on new ports"
                    );
                    last = log;
                }
            }
        }
        panic!("control plane: ports taken in {START_ATTEMPTS} attempts:\n{last}");
    }

    /// One start; `Err` (with the logs) when a component found its port taken.
    fn try_start() -> Result<ControlPlane, String> {
        let dir = std::env::temp_dir().join(format!(
            "pacer-k8s-{}-{}",
            std::process::id(),
            crate::apache::next_id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).expect("control plane dir");
        let port = free_port();
        let mut cp = ControlPlane {
            server: format!("https://127.0.0.1:{port}"),
            kubeconfig: dir.join("admin.kubeconfig"),
            controllers: bin_dir().join("kube-controller-manager").exists(),
            started_in: Duration::ZERO,
            dir,
            shell: None,
        };
        cp.write_keys();
        let admin = random_token();
        std::fs::write(
            cp.dir.join("tokens.csv"),
            format!("{admin},pacer-test-admin,pacer-test-admin,\"system:masters\"\n"),
        )
        .expect("token file");
        cp.write_kubeconfig(&cp.kubeconfig, &admin);
        std::fs::write(cp.dir.join("audit-policy.yaml"), AUDIT_POLICY).expect("audit policy");
        cp.write_commands(port);
        cp.launch_shell();
        let launched = Instant::now();
        cp.run("etcd");
        cp.run("kube-apiserver");
        cp.await_ready(launched)?;
        cp.started_in = launched.elapsed();
        if cp.controllers {
            cp.run("kube-controller-manager");
        }
        Ok(cp)
    }

    /// The folder with the components' logs (`NAME.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A component's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The audit log so far: one JSON `audit.k8s.io/v1` Event per line, at `Metadata`
    /// level (who, verb, object, response code), for requests of ServiceAccounts outside
    /// `kube-system`, written when the response completes.
    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default()
    }

    /// kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// kubectl with `kubeconfig`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        Command::new(tools_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl")
    }

    /// kubectl as the admin, with `stdin` piped in (`apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(tools_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("kubectl stdin")
            .write_all(stdin.as_bytes())
            .expect("write to kubectl");
        child.wait_with_output().expect("kubectl")
    }

    /// kubectl as the admin; panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        ok(self.kubectl(args), "kubectl", args)
    }

    /// helm as the admin, with its caches in this control plane's folder.
    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(tools_dir().join("helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .stdin(Stdio::null())
            .output()
            .expect("helm")
    }

    /// helm as the admin; panics with its output unless it succeeds; returns stdout.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        ok(self.helm(args), "helm", args)
    }

    /// Applies the repository's ThrottledConsumer CRD (server-side) and waits until the
    /// server serves its kind.
    pub fn install_crd(&self) {
        let crd = repo_root().join("crds/throttledconsumers.pacer.dev.yaml");
        self.kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/throttledconsumers.pacer.dev",
            "--timeout=60s",
        ]);
    }

    /// Creates a namespace named `prefix-N` (unique in this process) and returns it.
    pub fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{}", crate::apache::next_id());
        self.kubectl_ok(&["create", "namespace", &name]);
        name
    }

    /// A kubeconfig authenticating as ServiceAccount `ns/sa` with a fresh token
    /// (`kubectl create token`), so a client has exactly that account's RBAC.
    pub fn kubeconfig_for_service_account(&self, ns: &str, sa: &str) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", sa, "-n", ns, "--duration=2h"]);
        let path = self.dir.join(format!("{ns}-{sa}.kubeconfig"));
        self.write_kubeconfig(&path, token.trim());
        path
    }

    /// The service-account signing key pair: the API server verifies tokens with the
    /// public half, signs them (TokenRequest) and the controller-manager's token
    /// controller signs legacy ones with the private half.
    fn write_keys(&self) {
        let key = self.dir.join("certs/sa.key");
        run_ok(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(&key)
                .arg("2048"),
        );
        run_ok(
            Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(self.dir.join("certs/sa.pub")),
        );
    }

    /// A kubeconfig for `token`. The API server signs its own certificate for
    /// 127.0.0.1 (`--cert-dir`); that certificate is the CA clients trust (the file
    /// appears when the server starts, and clients read it when they connect).
    fn write_kubeconfig(&self, path: &Path, token: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n    namespace: default\ncurrent-context: test\n",
            self.server,
            self.dir.join("certs/apiserver.crt").display()
        );
        std::fs::write(path, text).expect("kubeconfig");
    }

    /// One shell script per component (`NAME.sh`), started by [`ControlPlane::run`].
    fn write_commands(&self, apiserver_port: u16) {
        let bin = bin_dir();
        let d = self.dir.display();
        let (client, peer) = (free_port(), free_port());
        let etcd = format!(
            "exec {bin}/etcd --name=test --data-dir={d}/etcd --unsafe-no-fsync \
             --listen-client-urls=http://127.0.0.1:{client} \
             --advertise-client-urls=http://127.0.0.1:{client} \
             --listen-peer-urls=http://127.0.0.1:{peer} \
             --initial-advertise-peer-urls=http://127.0.0.1:{peer} \
             --initial-cluster=test=http://127.0.0.1:{peer} \
             --listen-metrics-urls=http://127.0.0.1:0 --log-level=warn",
            bin = bin.display()
        );
        let apiserver = format!(
            "exec {bin}/kube-apiserver --etcd-servers=http://127.0.0.1:{client} \
             --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
             --secure-port={apiserver_port} --cert-dir={d}/certs \
             --service-cluster-ip-range=10.0.0.0/24 \
             --service-account-issuer=https://kubernetes.default.svc.cluster.local \
             --service-account-key-file={d}/certs/sa.pub \
             --service-account-signing-key-file={d}/certs/sa.key \
             --token-auth-file={d}/tokens.csv --authorization-mode=RBAC \
             --audit-policy-file={d}/audit-policy.yaml --audit-log-path={d}/audit.log \
             --audit-log-mode=blocking \
             --allow-privileged=true --enable-priority-and-fairness=false \
             --profiling=false -v=1",
            bin = bin.display()
        );
        // The controller-manager talks to the API server as the admin (it impersonates
        // each controller's ServiceAccount with --use-service-account-credentials).
        let kcm = format!(
            "exec {bin}/kube-controller-manager --kubeconfig={d}/admin.kubeconfig \
             --authentication-kubeconfig={d}/admin.kubeconfig \
             --authorization-kubeconfig={d}/admin.kubeconfig \
             --service-account-private-key-file={d}/certs/sa.key \
             --root-ca-file={d}/certs/apiserver.crt \
             --use-service-account-credentials=true --leader-elect=false \
             --bind-address=127.0.0.1 --secure-port=0 --controllers=* -v=1",
            bin = bin.display()
        );
        for (name, cmd) in [
            ("etcd", etcd),
            ("kube-apiserver", apiserver),
            ("kube-controller-manager", kcm),
        ] {
            std::fs::write(self.dir.join(format!("{name}.sh")), format!("{cmd}\n"))
                .expect("component script");
        }
    }

    /// The watching shell: `run NAME` starts `NAME.sh` in the background; end of file
    /// (dropped, or this process died) kills everything and removes the data.
    fn launch_shell(&mut self) {
        let script = r#"
            pids=""
            while read -r cmd name; do
              if [ "$cmd" = run ]; then
                sh "$PACER_K8S_DIR/$name.sh" </dev/null >>"$PACER_K8S_DIR/$name.log" 2>&1 &
                pids="$! $pids"
              fi
            done
            for p in $pids; do kill -KILL "$p" 2>/dev/null; done
            for p in $pids; do wait "$p" 2>/dev/null; done
            rm -rf "$PACER_K8S_DIR"
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PACER_K8S_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Null, not inherited: the shell outlives this process when it is held in a
            // static (one per test binary) and cleans up after it; an inherited stderr
            // would keep the test's output open meanwhile (nextest: leaked handles).
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for the control plane");
        let stdin = child.stdin.take().expect("control plane pipe");
        self.shell = Some((child, stdin));
    }

    fn run(&mut self, name: &str) {
        let (_, stdin) = self.shell.as_mut().expect("control plane shell");
        writeln!(stdin, "run {name}").expect("control plane pipe");
    }

    /// Polls `/readyz` until it answers `ok`; `Err` with the logs as soon as etcd or
    /// kube-apiserver found its port taken; panics with the logs after
    /// [`START_TIMEOUT`].
    fn await_ready(&self, launched: Instant) -> Result<(), String> {
        loop {
            let out = self.kubectl(&["get", "--raw=/readyz", "--request-timeout=2s"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return Ok(());
            }
            let logs = format!(
                "--- etcd:\n{}\n--- kube-apiserver:\n{}",
                tail(&self.log("etcd"), 30),
                tail(&self.log("kube-apiserver"), 60)
            );
            if logs.contains("address already in use") {
                return Err(logs);
            }
            assert!(
                launched.elapsed() < START_TIMEOUT,
                "kube-apiserver not ready within {START_TIMEOUT:?}: {}\n{logs}",
                String::from_utf8_lossy(&out.stderr),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (bounded) until `ns` has its `default` ServiceAccount: the
    /// controller-manager's serviceaccount controller makes it, and the ServiceAccount
    /// admission plugin refuses Pods without it.
    pub fn await_default_service_account(&self, ns: &str) {
        let from = Instant::now();
        while !self
            .kubectl(&["get", "serviceaccount", "default", "-n", ns])
            .status
            .success()
        {
            assert!(
                from.elapsed() < Duration::from_secs(60),
                "no default ServiceAccount in {ns} after 60 s; controller-manager log:\n{}",
                tail(&self.log("kube-controller-manager"), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.shell.take() {
            drop(stdin);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stdout of a successful `tool args`; panics with both streams otherwise.
fn ok(out: Output, tool: &str, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "{tool} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("openssl (install the openssl package)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 32 hex characters from the OS's randomness.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    let f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut &f, &mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! A kubelet for tests: plays the node for one namespace's Pods (those matching a label
//! selector) on a control plane without a scheduler or a kubelet ([`crate::k8s`]), by
//! running one container of each Pod as a local process.
//!
//! Each poll (every [`KubeletConfig::poll`]) it lists the Pods and, like a kubelet:
//!
//! - binds a Pod without a node to its own Node (the `pods/binding` subresource; the Node
//!   object is created at start and its `Ready` condition renewed every 10 s, or the
//!   controller-manager's node-lifecycle controller would mark the Pods not ready and
//!   its pod GC delete Pods bound to a node that does not exist);
//! - starts the container as `program` with the container's `command[1..]` and `args`
//!   and its environment: plain values with `$(VAR)` expanded as Kubernetes does,
//!   downward-API `fieldRef`s (`metadata.name` and the like), `secretKeyRef`s read from
//!   the Secret; Secret volumes are written as files under a temp folder, and every
//!   value or argument naming a mount path or a container port is rewritten to the
//!   file's path or to `127.0.0.1:<free port>` (so replicas side by side do not
//!   collide): see [`launch`], pure and unit-tested;
//! - reports `status` (phase `Running`, `containerStatuses`, conditions `Ready` and
//!   `ContainersReady` from the readiness probe's `httpGet`, probed every poll instead of
//!   every `periodSeconds`, with the probe's success and failure thresholds), so the
//!   ReplicaSet and the Deployment count ready replicas;
//! - on a `deletionTimestamp`: SIGTERM, waits up to the Pod's grace period, SIGKILL,
//!   then deletes the Pod with grace 0 (what the kubelet's status manager does);
//! - a process that exits on its own is reported terminated and started again
//!   (`restartPolicy: Always`) after a back-off of 1 s doubling to 10 s (a real kubelet:
//!   10 s doubling to 5 min); a Pod that disappeared has its process killed.
//!
//! Not done: other containers than the configured one (such a Pod is reported waiting
//! with reason `NotSupportedByTestKubelet`), liveness probes, init containers,
//! ConfigMaps, resource limits, the image (every container runs `program`).
//!
//! Every API call has a timeout and every wait is bounded. Processes are always reaped:
//! dropping the [`Kubelet`] SIGKILLs and waits for each, and a watchdog shell holding a
//! pipe from this process SIGKILLs them if this process dies without dropping it (a
//! panic in another thread, nextest's timeout kill).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::chrono::{SecondsFormat, Utc};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{json, Value};

/// Longest any one API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the Node's `Ready` condition is renewed (the controller-manager's grace
/// period is 50 s).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest a readiness probe may take (a real probe's default `timeoutSeconds` is 1).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// First restart back-off of a container that exited, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest a SIGKILLed process may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period when neither the Pod's deletion nor its spec says.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Longest [`Kubelet::start`] waits for the API server to take the Node.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What a [`Kubelet`] runs, and how.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// A kubeconfig allowed to list, bind, update and delete the Pods, read the Secrets
    /// they use, and create Nodes (the control plane's admin).
    pub kubeconfig: PathBuf,
    pub namespace: String,
    /// Label selector of the Pods this kubelet runs (`a=b,c=d`).
    pub selector: String,
    /// Name of the container to run; Pods with other containers are not run.
    pub container: String,
    /// The program standing in for the container's image.
    pub program: PathBuf,
    /// Time between two polls of the Pods (and two readiness probes).
    pub poll: Duration,
    /// Variables set before the Pod's own (which win), e.g. a log level.
    pub extra_env: Vec<(String, String)>,
    /// First restart back-off of a container that exited (doubled up to 10 s).
    pub first_backoff: Duration,
}

impl KubeletConfig {
    /// Runs container `container` of the Pods matching `selector` in `namespace` as
    /// `program`, polling every 100 ms.
    pub fn new(
        kubeconfig: &Path,
        namespace: &str,
        selector: &str,
        container: &str,
        program: &Path,
    ) -> Self {
        Self {
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.into(),
            selector: selector.into(),
            container: container.into(),
            program: program.to_path_buf(),
            poll: Duration::from_millis(100),
            extra_env: Vec::new(),
            first_backoff: FIRST_BACKOFF,
        }
    }
}

/// Something the kubelet did to a Pod, with when ([`Kubelet::records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bound to this kubelet's Node.
    Bound,
    /// The process started (`restarts` earlier starts of this Pod).
    Started { pid: u32, restarts: u32 },
    /// Reported `Ready=True`.
    Ready,
    /// Reported `Ready=False` after being ready.
    NotReady,
    /// The Pod is being deleted: SIGTERM sent.
    Terminating,
    /// SIGKILL sent (grace period over, or the Pod vanished).
    Killed,
    /// The process exited (`None`: killed by a signal).
    Exited { code: Option<i32> },
    /// The Pod object was deleted with grace 0, or vanished.
    Deleted,
    /// The Pod could not be started (missing Secret, unsupported field...).
    Failed(String),
}

/// One entry of the kubelet's log.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: Instant,
    pub pod: String,
    pub event: Event,
}

/// What the kubelet thread and the test share.
#[derive(Debug, Default)]
struct Shared {
    /// Running processes by Pod uid, with the Pod's name.
    children: HashMap<String, (String, Child)>,
    records: Vec<Record>,
    /// Pods reported ready now.
    ready: BTreeSet<String>,
    /// The container ports of each Pod's current process, by Pod name.
    ports: HashMap<String, Vec<PortMap>>,
    /// API errors (transient ones are retried on the next poll).
    errors: Vec<String>,
}

/// A running test kubelet; dropping it kills and reaps every process it started.
#[derive(Debug)]
pub struct Kubelet {
    pub node: String,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    watchdog: Arc<Mutex<Watchdog>>,
}

impl Kubelet {
    /// Creates the Node and starts polling. Panics if the API server does not take the
    /// Node within a minute.
    pub fn start(config: KubeletConfig) -> Kubelet {
        let node = format!("test-node-{}", config.namespace);
        let dir = std::env::temp_dir().join(format!(
            "pacer-kubelet-{}-{}",
            std::process::id(),
            crate::apache::next_id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("kubelet dir");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = Arc::new(Mutex::new(Watchdog::start()));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = {
            let (shared, stop, watchdog) = (shared.clone(), stop.clone(), watchdog.clone());
            let (node, dir) = (node.clone(), dir.clone());
            std::thread::Builder::new()
                .name("test-kubelet".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("kubelet runtime");
                    rt.block_on(async move {
                        let mut k = match Loop::connect(config, node, dir, shared, watchdog).await {
                            Ok(k) => {
                                let _ = started_tx.send(Ok(()));
                                k
                            }
                            Err(e) => {
                                let _ = started_tx.send(Err(e));
                                return;
                            }
                        };
                        k.run(&stop).await;
                    });
                })
                .expect("spawn the kubelet thread")
        };
        let mut kubelet = Kubelet {
            node,
            dir,
            shared,
            stop,
            thread: Some(thread),
            watchdog,
        };
        match started_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => kubelet,
            Ok(Err(e)) => {
                kubelet.shutdown();
                panic!("test kubelet did not start: {e}")
            }
            Err(_) => {
                kubelet.shutdown();
                panic!("test kubelet did not start within {START_TIMEOUT:?}")
            }
        }
    }

    /// Everything the kubelet did so far, oldest first.
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// Names of the Pods reported ready now.
    pub fn ready_pods(&self) -> BTreeSet<String> {
        self.lock().ready.clone()
    }

    /// Names of the Pods whose process runs now (terminating ones included).
    pub fn running_pods(&self) -> BTreeSet<String> {
        self.lock()
            .children
            .values()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// SIGKILLs `pod`'s process, as the kernel's OOM killer or a crash would end it: the
    /// kubelet then reports the container terminated (with its termination message)
    /// and starts it again after its back-off. False if no process of `pod` runs.
    pub fn kill(&self, pod: &str) -> bool {
        self.lock()
            .children
            .values_mut()
            .find(|(name, _)| name == pod)
            .is_some_and(|(_, child)| child.kill().is_ok())
    }

    /// The local port standing in for `container_port` of `pod`'s running process.
    pub fn host_port(&self, pod: &str, container_port: u16) -> Option<u16> {
        self.lock()
            .ports
            .get(pod)?
            .iter()
            .find(|p| p.container == container_port)
            .map(|p| p.host)
    }

    /// API errors seen so far (each was retried on the next poll).
    pub fn errors(&self) -> Vec<String> {
        self.lock().errors.clone()
    }

    /// The output of a Pod's process (every start, appended).
    pub fn log(&self, pod: &str) -> String {
        std::fs::read_to_string(self.dir.join(pod).join("container.log")).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Whatever the thread left (it kills its children when it stops, but it may
        // have panicked).
        let children: Vec<(String, Child)> = self.lock().children.drain().map(|(_, c)| c).collect();
        for (_, mut child) in children {
            let _ = child.kill();
            let _ = child.wait();
            self.watchdog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget(child.id());
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shutdown();
        self.watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A shell that SIGKILLs every process it was told about ([`Watchdog::watch`]) when its
/// pipe closes: when this process dies without reaping them (a panic in another thread,
/// nextest's timeout kill). Dropping it after reaping them costs nothing.
#[derive(Debug)]
pub struct Watchdog {
    shell: Option<(Child, ChildStdin)>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Watchdog {
    pub fn start() -> Watchdog {
        let script = r#"
            pids=" "
            while read -r cmd pid; do
              case "$cmd" in
                watch) pids="$pids$pid " ;;
                forget) pids=$(printf '%s' "$pids" | sed "s/ $pid / /") ;;
              esac
            done
            for p in $pids; do kill -KILL "$p" 2>/dev/null; done
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Null, not inherited: the shell outlives this process when it is held in a
            // static (one per test binary) and cleans up after it; an inherited stderr
            // would keep the test's output open meanwhile (nextest: leaked handles).
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the kubelet's watchdog shell");
        let stdin = child.stdin.take().expect("watchdog pipe");
        Watchdog {
            shell: Some((child, stdin)),
        }
    }

    /// Kill `pid` if this process dies.
    pub fn watch(&mut self, pid: u32) {
        if let Some((_, stdin)) = &mut self.shell {
            let _ = writeln!(stdin, "watch {pid}");
        }
    }

    /// `pid` was reaped: leave it alone.
    pub fn forget(&mut self, pid: u32) {
        if let Some((_, stdin)) = &mut self.shell {
            let _ = writeln!(stdin, "forget {pid}");
        }
    }

    /// Closes the pipe: whatever is still watched is killed now.
    pub fn close(&mut self) {
        if let Some((mut child, stdin)) = self.shell.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// A file to write before the process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// A container port and the local port standing in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMap {
    pub name: Option<String>,
    pub container: u16,
    pub host: u16,
}

/// The readiness probe, resolved to a local port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// How to run one container of a Pod here: the result of [`launch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The container's termination message file here (its `terminationMessagePath`,
    /// `/dev/termination-log` by default, is rewritten to it like a mount): emptied at
    /// each start, read when the process ends and reported as `terminated.message`.
    pub termination_log: PathBuf,
    /// Folders to create (Secret and emptyDir volumes).
    pub dirs: Vec<PathBuf>,
    pub files: Vec<File>,
    pub ports: Vec<PortMap>,
    pub readiness: Option<HttpProbe>,
}

/// Secrets by name, each a map from key to value.
pub type Secrets = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// Names of the Secrets container `container` of `pod` needs (volumes it mounts and
/// `secretKeyRef`s).
pub fn secrets_needed(pod: &Pod, container: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(spec) = &pod.spec else { return out };
    let Some(c) = spec.containers.iter().find(|c| c.name == container) else {
        return out;
    };
    for e in c.env.iter().flatten() {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            out.insert(r.name.clone());
        }
    }
    for m in c.volume_mounts.iter().flatten() {
        let vol = spec.volumes.iter().flatten().find(|v| v.name == m.name);
        if let Some(name) = vol
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
        {
            out.insert(name);
        }
    }
    out
}

/// How to run container `container` of `pod` as a local process. Pure: `secrets` holds
/// the Secrets of [`secrets_needed`], volumes go under `root`, and `free_port` gives a
/// local port for each container port.
pub fn launch(
    pod: &Pod,
    container: &str,
    secrets: &Secrets,
    root: &Path,
    mut free_port: impl FnMut() -> u16,
) -> Result<Launch, String> {
    let spec = pod.spec.as_ref().ok_or("the Pod has no spec")?;
    let c: &Container = spec
        .containers
        .iter()
        .find(|c| c.name == container)
        .ok_or_else(|| format!("the Pod has no container {container:?}"))?;
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err("envFrom is not supported by the test kubelet".into());
    }

    let mut ports = Vec::new();
    for p in c.ports.iter().flatten() {
        let container_port = u16::try_from(p.container_port)
            .map_err(|_| format!("container port {} out of range", p.container_port))?;
        ports.push(PortMap {
            name: p.name.clone(),
            container: container_port,
            host: free_port(),
        });
    }

    // Volumes: (mount path in the container, path here).
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .ok_or_else(|| format!("volume {:?} is mounted but not defined", m.name))?;
        let here = root.join("volumes").join(&vol.name);
        if !dirs.contains(&here) {
            if let Some(s) = &vol.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data = match secrets.get(&name) {
                    Some(d) => d.clone(),
                    None if s.optional == Some(true) => BTreeMap::new(),
                    None => return Err(format!("Secret {name:?} not found")),
                };
                let mode = s.default_mode.unwrap_or(0o644) as u32;
                match &s.items {
                    Some(items) => {
                        for item in items {
                            let value = data.get(&item.key).ok_or_else(|| {
                                format!("Secret {name:?} has no key {:?}", item.key)
                            })?;
                            files.push(File {
                                path: here.join(&item.path),
                                contents: value.clone(),
                                mode: item.mode.map_or(mode, |m| m as u32),
                            });
                        }
                    }
                    None => {
                        for (key, value) in &data {
                            files.push(File {
                                path: here.join(key),
                                contents: value.clone(),
                                mode,
                            });
                        }
                    }
                }
            } else if vol.projected.is_some() {
                return Err(format!(
                    "volume {:?}: projected volumes (the ServiceAccount token the admission \
                     plugin adds) are not supported: set automountServiceAccountToken: false",
                    vol.name
                ));
            } else if vol.empty_dir.is_none() {
                return Err(format!(
                    "volume {:?}: only secret and emptyDir volumes are supported",
                    vol.name
                ));
            }
            dirs.push(here.clone());
        }
        let path = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => here.join(sub),
            None => here,
        };
        mounts.push((m.mount_path.trim_end_matches('/').to_string(), path));
    }
    let termination_log = root.join("termination-log");
    let message_path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push((message_path, termination_log.clone()));
    // The longest mount path first, so a nested mount wins.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));

    // Environment, in order: `$(VAR)` expands only to variables defined earlier.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field_value(pod, &f.field_path)?
                } else if let Some(r) = &from.secret_key_ref {
                    match secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
                        Some(v) => String::from_utf8(v.clone()).map_err(|_| {
                            format!("Secret {:?} key {:?} is not UTF-8", r.name, r.key)
                        })?,
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "Secret {:?} has no key {:?} (for {})",
                                r.name, r.key, e.name
                            ))
                        }
                    }
                } else {
                    return Err(format!(
                        "{}: only fieldRef and secretKeyRef are supported",
                        e.name
                    ));
                }
            }
            (Some(v), None) => expand(v, |name| lookup(&env, name)),
            (None, None) => String::new(),
        };
        env.retain(|(n, _)| n != &e.name);
        env.push((e.name.clone(), value));
    }
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(n, v)| {
            let v = rewrite(&v, &mounts, &ports);
            (n, v)
        })
        .collect();

    // The image's entrypoint is `program`: `command[0]` is replaced by it.
    let mut args: Vec<String> = c.command.iter().flatten().skip(1).cloned().collect();
    args.extend(c.args.iter().flatten().cloned());
    let args = args
        .iter()
        .map(|a| rewrite(&expand(a, |name| lookup(&env, name)), &mounts, &ports))
        .collect();

    let readiness = match c.readiness_probe.as_ref() {
        None => None,
        Some(p) => {
            let get = p
                .http_get
                .as_ref()
                .ok_or("only httpGet readiness probes are supported")?;
            let port = match &get.port {
                IntOrString::Int(n) => ports.iter().find(|p| i32::from(p.container) == *n),
                IntOrString::String(s) => ports.iter().find(|p| p.name.as_deref() == Some(s)),
            }
            .ok_or_else(|| {
                format!(
                    "readiness probe port {:?} is not a container port",
                    get.port
                )
            })?;
            Some(HttpProbe {
                path: get.path.clone().unwrap_or_else(|| "/".into()),
                port: port.host,
                success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
                failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
            })
        }
    };

    Ok(Launch {
        args,
        env,
        termination_log,
        dirs,
        files,
        ports,
        readiness,
    })
}

fn lookup(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

/// A downward-API field of the Pod.
pub fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    let value = match path {
        "metadata.name" => m.name.clone(),
        "metadata.namespace" => m.namespace.clone(),
        "metadata.uid" => m.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.hostIP" => Some("127.0.0.1".into()),
        _ => keyed("metadata.labels['", &m.labels)
            .or_else(|| keyed("metadata.annotations['", &m.annotations))
            .map(Some)
            .ok_or_else(|| format!("fieldRef {path:?} is not supported by the test kubelet"))?,
    };
    Ok(value.unwrap_or_default())
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` is replaced by the variable's value when
/// it is defined and left as is otherwise, `$$` is a literal `$`, and any other `$` is
/// kept (k8s.io/kubernetes third_party/forked/golang/expansion).
pub fn expand(input: &str, mapping: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(next) = after.chars().next() else {
            // A trailing `$`.
            out.push('$');
            rest = after;
            break;
        };
        match next {
            '$' => {
                out.push('$');
                rest = &after[1..];
            }
            '(' => match after.find(')') {
                Some(j) => {
                    let name = &after[1..j];
                    match mapping(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            c => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A value (or the part after the first `=` of `--flag=value`) that names a mounted
/// path becomes the path here; one that is an address on a container port (any host
/// of `0.0.0.0`, `::`, `127.0.0.1`, `localhost` or none) becomes `127.0.0.1:<local
/// port>`. Anything else is kept.
pub fn rewrite(value: &str, mounts: &[(String, PathBuf)], ports: &[PortMap]) -> String {
    if let Some(v) = rewrite_whole(value, mounts, ports) {
        return v;
    }
    if let Some((flag, v)) = value.split_once('=') {
        if let Some(v) = rewrite_whole(v, mounts, ports) {
            return format!("{flag}={v}");
        }
    }
    value.to_string()
}

fn rewrite_whole(value: &str, mounts: &[(String, PathBuf)], ports: &[PortMap]) -> Option<String> {
    for (inside, here) in mounts {
        if value == inside {
            return Some(here.display().to_string());
        }
        if let Some(rest) = value.strip_prefix(inside.as_str()) {
            if let Some(rest) = rest.strip_prefix('/') {
                return Some(here.join(rest).display().to_string());
            }
        }
    }
    let (host, port) = value.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let local = matches!(
        host,
        "" | "0.0.0.0" | "[::]" | "127.0.0.1" | "localhost" | "[::1]"
    );
    let mapped = ports.iter().find(|p| p.container == port)?;
    local.then(|| format!("127.0.0.1:{}", mapped.host))
}

/// An RFC 3339 time as Kubernetes writes it.
fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A container that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    started_at: String,
    finished_at: String,
    /// What the container left in its termination message file (at most 4 KiB, as a
    /// kubelet reads).
    message: Option<String>,
}

impl Terminated {
    fn json(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": if self.exit_code == 0 { "Completed" } else { "Error" },
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        });
        if let Some(s) = self.signal {
            t["signal"] = json!(s);
        }
        if let Some(m) = &self.message {
            t["message"] = json!(m);
        }
        t
    }
}

/// A container's termination message: the first 4 KiB of its file, if any (a kubelet's
/// limit per container).
fn termination_message(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let bytes = &bytes[..bytes.len().min(4096)];
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// What this kubelet knows of one Pod (by uid).
#[derive(Debug)]
struct PodRun {
    name: String,
    image: String,
    started_at: Option<String>,
    pid: Option<u32>,
    launch: Option<Launch>,
    restarts: u32,
    ready: bool,
    successes: u32,
    failures: u32,
    ready_since: String,
    last_terminated: Option<Terminated>,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// SIGTERM sent; SIGKILL at this deadline.
    kill_at: Option<Instant>,
    delete_sent: bool,
    waiting: Option<(String, String)>,
    /// The last status sent (a patch goes out only when it changes).
    reported: Option<Value>,
}

impl PodRun {
    fn new(pod: &Pod, container: &str, first_backoff: Duration) -> PodRun {
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == container))
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        PodRun {
            name: pod.metadata.name.clone().unwrap_or_default(),
            image,
            started_at: None,
            pid: None,
            launch: None,
            restarts: 0,
            ready: false,
            successes: 0,
            failures: 0,
            ready_since: now_rfc3339(),
            last_terminated: None,
            restart_at: None,
            backoff: first_backoff,
            kill_at: None,
            delete_sent: false,
            waiting: None,
            reported: None,
        }
    }

    /// The Pod's status as a kubelet reports it.
    fn status(&self, container: &str) -> Value {
        let running = self.pid.is_some();
        let ready = running && self.ready;
        let truth = |b: bool| if b { "True" } else { "False" };
        let state = if let (true, Some(at)) = (running, &self.started_at) {
            json!({"running": {"startedAt": at}})
        } else if let Some((reason, message)) = &self.waiting {
            json!({"waiting": {"reason": reason, "message": message}})
        } else if let Some(t) = &self.last_terminated {
            json!({"terminated": t.json()})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        let mut cs = json!({
            "name": container,
            "image": self.image,
            "imageID": "",
            "ready": ready,
            "started": running,
            "restartCount": self.restarts,
            "state": state,
        });
        if let Some(pid) = self.pid {
            cs["containerID"] = json!(format!("pid://{pid}"));
        }
        if let (true, Some(t)) = (running || self.waiting.is_some(), &self.last_terminated) {
            cs["lastState"] = json!({"terminated": t.json()});
        }
        let since = &self.ready_since;
        json!({
            "status": {
                "phase": if self.started_at.is_some() || self.last_terminated.is_some() { "Running" } else { "Pending" },
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "conditions": [
                    {"type": "PodReadyToStartContainers", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": truth(ready), "lastTransitionTime": since},
                    {"type": "Ready", "status": truth(ready), "lastTransitionTime": since},
                ],
                "containerStatuses": [cs],
            }
        })
    }
}

/// The kubelet's thread: its client, its Pods.
struct Loop {
    config: KubeletConfig,
    node: String,
    dir: PathBuf,
    client: kube::Client,
    shared: Arc<Mutex<Shared>>,
    watchdog: Arc<Mutex<Watchdog>>,
    pods: HashMap<String, PodRun>,
    started: Instant,
}

/// `fut` with [`API_TIMEOUT`], its error as a string.
async fn timed<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {API_TIMEOUT:?}")),
    }
}

impl Loop {
    async fn connect(
        config: KubeletConfig,
        node: String,
        dir: PathBuf,
        shared: Arc<Mutex<Shared>>,
        watchdog: Arc<Mutex<Watchdog>>,
    ) -> Result<Loop, String> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&config.kubeconfig)
            .map_err(|e| format!("reading {}: {e}", config.kubeconfig.display()))?;
        let mut kc = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?;
        kc.connect_timeout = Some(API_TIMEOUT);
        kc.read_timeout = Some(API_TIMEOUT);
        kc.write_timeout = Some(API_TIMEOUT);
        let client = kube::Client::try_from(kc).map_err(|e| format!("client: {e}"))?;
        let k = Loop {
            config,
            node,
            dir,
            client,
            shared,
            watchdog,
            pods: HashMap::new(),
            started: Instant::now(),
        };
        k.create_node().await?;
        Ok(k)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, pod: &str, event: Event) {
        eprintln!(
            "[kubelet {:7.3} s] {pod}: {event:?}",
            self.started.elapsed().as_secs_f64()
        );
        let mut s = self.lock();
        match &event {
            Event::Ready => {
                s.ready.insert(pod.to_string());
            }
            Event::NotReady | Event::Exited { .. } | Event::Terminating => {
                s.ready.remove(pod);
            }
            Event::Deleted => {
                s.ready.remove(pod);
                s.ports.remove(pod);
            }
            _ => {}
        }
        s.records.push(Record {
            at: Instant::now(),
            pod: pod.to_string(),
            event,
        });
    }

    fn error(&self, e: String) {
        eprintln!("[kubelet] {e}");
        self.lock().errors.push(e);
    }

    async fn create_node(&self) -> Result<(), String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "pacer.dev/test-kubelet": "true"},
            },
        }))
        .expect("node object");
        match timed(
            "creating the Node",
            nodes.create(&PostParams::default(), &node),
        )
        .await
        {
            Ok(_) => {}
            Err(e) if e.contains("already exists") => {}
            Err(e) => return Err(e),
        }
        self.heartbeat().await
    }

    /// The Node's `Ready` condition, with a fresh heartbeat.
    async fn heartbeat(&self) -> Result<(), String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let now = now_rfc3339();
        let patch = json!({
            "status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "pacer test kubelet is posting ready status",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.node},
                ],
                "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            }
        });
        timed(
            "renewing the Node's Ready condition",
            nodes.patch_status(
                &self.node,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            ),
        )
        .await
        .map(|_| ())
    }

    async fn run(&mut self, stop: &AtomicBool) {
        let mut next_heartbeat = Instant::now() + HEARTBEAT;
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= next_heartbeat {
                if let Err(e) = self.heartbeat().await {
                    self.error(e);
                }
                next_heartbeat = Instant::now() + HEARTBEAT;
            }
            self.poll().await;
            tokio::time::sleep(self.config.poll).await;
        }
        self.kill_all();
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    async fn poll(&mut self) {
        let lp = ListParams::default().labels(&self.config.selector);
        let list = match timed("listing Pods", self.pods_api().list(&lp)).await {
            Ok(l) => l.items,
            Err(e) => return self.error(e),
        };
        let present: BTreeSet<String> =
            list.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        // Pods that vanished: their processes go.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !present.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(run) = self.pods.remove(&uid) {
                if run.pid.is_some() {
                    self.record(&run.name, Event::Killed);
                    self.kill(&uid, &run.name);
                }
                self.record(&run.name, Event::Deleted);
            }
        }
        for pod in &list {
            self.sync(pod).await;
        }
        self.probe_all().await;
        for pod in &list {
            self.report(pod).await;
        }
    }

    /// Binds, starts, restarts or terminates one Pod.
    async fn sync(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        match &node_name {
            Some(n) if n != &self.node => return, // someone else's
            Some(_) => {}
            None if pod.metadata.deletion_timestamp.is_none() => {
                if let Err(e) = self.bind(&name).await {
                    return self.error(e);
                }
                self.record(&name, Event::Bound);
            }
            None => {}
        }
        let container = self.config.container.clone();
        let first_backoff = self.config.first_backoff;
        self.pods
            .entry(uid.clone())
            .or_insert_with(|| PodRun::new(pod, &container, first_backoff));
        self.reap(&uid);

        if pod.metadata.deletion_timestamp.is_some() {
            return self.terminate(pod, &uid).await;
        }
        let run = &self.pods[&uid];
        if run.pid.is_none() && run.restart_at.is_none_or(|t| Instant::now() >= t) {
            self.start_container(pod, &uid).await;
        }
    }

    async fn bind(&self, name: &str) -> Result<(), String> {
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        timed(
            &format!("binding Pod {name}"),
            self.pods_api().create_subresource::<Value>(
                "binding",
                name,
                &PostParams::default(),
                serde_json::to_vec(&binding).expect("binding json"),
            ),
        )
        .await
        .map(|_| ())
    }

    async fn read_secrets(&self, names: &BTreeSet<String>) -> Result<Secrets, String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let mut out = Secrets::new();
        for name in names {
            let s = timed(&format!("reading Secret {name}"), api.get_opt(name)).await?;
            if let Some(s) = s {
                let data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                out.insert(name.clone(), data);
            }
        }
        Ok(out)
    }

    async fn start_container(&mut self, pod: &Pod, uid: &str) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let container = self.config.container.clone();
        let others: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| c.name.clone())
            .filter(|n| n != &container)
            .collect();
        if !others.is_empty() {
            let why = format!("containers {others:?} cannot run here: only {container:?} is run");
            let run = self.pods.get_mut(uid).expect("pod run");
            if run.waiting.is_none() {
                run.waiting = Some(("NotSupportedByTestKubelet".into(), why.clone()));
                self.record(&name, Event::Failed(why));
            }
            return;
        }
        let needed = secrets_needed(pod, &container);
        let launched = match self.read_secrets(&needed).await {
            Ok(secrets) => launch(pod, &container, &secrets, &self.dir.join(&name), || {
                crate::apache::free_port()
            }),
            Err(e) => Err(e),
        };
        let l = match launched {
            Ok(l) => l,
            Err(why) => {
                let run = self.pods.get_mut(uid).expect("pod run");
                let first = run.waiting.is_none();
                run.waiting = Some(("CreateContainerConfigError".into(), why.clone()));
                run.restart_at = Some(Instant::now() + FIRST_BACKOFF);
                if first {
                    self.record(&name, Event::Failed(why));
                }
                return;
            }
        };
        match self.spawn(&name, &l) {
            Ok(child) => {
                let pid = child.id();
                self.watchdog
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .watch(pid);
                {
                    let mut shared = self.lock();
                    shared
                        .children
                        .insert(uid.to_string(), (name.clone(), child));
                    shared.ports.insert(name.clone(), l.ports.clone());
                }
                let run = self.pods.get_mut(uid).expect("pod run");
                if run.last_terminated.is_some() {
                    run.restarts += 1;
                }
                run.pid = Some(pid);
                run.started_at = Some(now_rfc3339());
                run.launch = Some(l);
                run.waiting = None;
                run.restart_at = None;
                run.ready = false;
                run.successes = 0;
                run.failures = 0;
                let restarts = run.restarts;
                self.record(&name, Event::Started { pid, restarts });
            }
            Err(why) => {
                let run = self.pods.get_mut(uid).expect("pod run");
                run.waiting = Some(("RunContainerError".into(), why.clone()));
                run.restart_at = Some(Instant::now() + run.backoff);
                run.backoff = (run.backoff * 2).min(MAX_BACKOFF);
                self.record(&name, Event::Failed(why));
            }
        }
    }

    fn spawn(&self, pod: &str, l: &Launch) -> Result<Child, String> {
        let dir = self.dir.join(pod);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for d in &l.dirs {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        for f in &l.files {
            use std::os::unix::fs::PermissionsExt;
            if let Some(parent) = f.path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            // A restart writes the files again: make an old read-only copy writable.
            let _ = std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o600));
            std::fs::write(&f.path, &f.contents)
                .map_err(|e| format!("{}: {e}", f.path.display()))?;
            std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode))
                .map_err(|e| format!("{}: {e}", f.path.display()))?;
        }
        // Each run starts with an empty termination message, as under a real kubelet.
        std::fs::write(&l.termination_log, b"")
            .map_err(|e| format!("{}: {e}", l.termination_log.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("container.log"))
            .map_err(|e| format!("container log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("container log: {e}"))?;
        Command::new(&self.config.program)
            .args(&l.args)
            .env_clear()
            // What a container runtime sets before the Pod's variables.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOSTNAME", pod)
            .envs(self.config.extra_env.iter().cloned())
            .envs(l.env.iter().cloned())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.config.program.display()))
    }

    /// Notices a process that exited: records it, schedules a restart unless the Pod
    /// is being deleted.
    fn reap(&mut self, uid: &str) {
        let exited = {
            let mut s = self.lock();
            let status = match s.children.get_mut(uid) {
                Some((_, child)) => child.try_wait().ok().flatten(),
                None => None,
            };
            if status.is_some() {
                s.children.remove(uid);
            }
            status
        };
        let Some(status) = exited else { return };
        let Some(run) = self.pods.get_mut(uid) else {
            return;
        };
        if let Some(pid) = run.pid.take() {
            self.watchdog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget(pid);
        }
        use std::os::unix::process::ExitStatusExt;
        let t = Terminated {
            exit_code: status.code().unwrap_or(128 + status.signal().unwrap_or(0)),
            signal: status.signal(),
            started_at: run.started_at.take().unwrap_or_else(now_rfc3339),
            finished_at: now_rfc3339(),
            message: run
                .launch
                .as_ref()
                .and_then(|l| termination_message(&l.termination_log)),
        };
        run.last_terminated = Some(t);
        if run.ready {
            run.ready = false;
            run.ready_since = now_rfc3339();
        }
        if run.kill_at.is_none() {
            // Exited on its own: restartPolicy Always.
            run.restart_at = Some(Instant::now() + run.backoff);
            run.waiting = Some((
                "CrashLoopBackOff".into(),
                format!("back-off {:?} restarting the failed container", run.backoff),
            ));
            run.backoff = (run.backoff * 2).min(MAX_BACKOFF);
        }
        let name = run.name.clone();
        self.record(
            &name,
            Event::Exited {
                code: status.code(),
            },
        );
    }

    /// SIGTERM, then after the grace period SIGKILL; once the process is gone, delete
    /// the Pod with grace 0.
    async fn terminate(&mut self, pod: &Pod, uid: &str) {
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .map_or(DEFAULT_GRACE, |s| Duration::from_secs(s.max(0) as u64));
        let run = self.pods.get_mut(uid).expect("pod run");
        run.restart_at = None;
        let name = run.name.clone();
        if let Some(pid) = run.pid {
            match run.kill_at {
                None => {
                    run.kill_at = Some(Instant::now() + grace);
                    if run.ready {
                        run.ready = false;
                        run.ready_since = now_rfc3339();
                    }
                    signal(pid, "-TERM");
                    self.record(&name, Event::Terminating);
                }
                Some(at) if Instant::now() >= at => {
                    self.record(&name, Event::Killed);
                    self.kill(uid, &name);
                }
                Some(_) => {}
            }
            return;
        }
        // No process (any more): the Pod object goes.
        let run = self.pods.get_mut(uid).expect("pod run");
        if run.delete_sent {
            return;
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match timed(
            &format!("deleting Pod {name}"),
            self.pods_api().delete(&name, &dp),
        )
        .await
        {
            Ok(_) => {
                if let Some(run) = self.pods.get_mut(uid) {
                    run.delete_sent = true;
                }
            }
            Err(e) if e.contains("not found") => {}
            Err(e) => self.error(e),
        }
    }

    /// SIGKILL and reap (bounded).
    fn kill(&mut self, uid: &str, name: &str) {
        let taken = self.lock().children.remove(uid);
        if let Some((_, mut child)) = taken {
            let _ = child.kill();
            let until = Instant::now() + REAP_TIMEOUT;
            let mut status = None;
            while Instant::now() < until {
                if let Ok(Some(s)) = child.try_wait() {
                    status = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if status.is_none() {
                self.error(format!(
                    "{name}: pid {} not reaped after SIGKILL",
                    child.id()
                ));
                // Keep it for Drop to wait on.
                self.lock()
                    .children
                    .insert(uid.to_string(), (name.to_string(), child));
            } else {
                self.watchdog
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget(child.id());
                self.record(
                    name,
                    Event::Exited {
                        code: status.and_then(|s| s.code()),
                    },
                );
            }
        }
        if let Some(run) = self.pods.get_mut(uid) {
            if let Some(started) = run.started_at.take() {
                run.last_terminated = Some(Terminated {
                    exit_code: 137,
                    signal: Some(9),
                    started_at: started,
                    finished_at: now_rfc3339(),
                    message: run
                        .launch
                        .as_ref()
                        .and_then(|l| termination_message(&l.termination_log)),
                });
            }
            run.pid = None;
            run.ready = false;
        }
    }

    fn kill_all(&mut self) {
        let uids: Vec<(String, String)> = self
            .lock()
            .children
            .iter()
            .map(|(uid, (name, _))| (uid.clone(), name.clone()))
            .collect();
        for (uid, name) in uids {
            self.kill(&uid, &name);
        }
    }

    /// Readiness probes of every running, not terminating, Pod, at once.
    async fn probe_all(&mut self) {
        let targets: Vec<(String, HttpProbe)> = self
            .pods
            .iter()
            .filter(|(_, r)| r.pid.is_some() && r.kill_at.is_none())
            .filter_map(|(uid, r)| {
                let p = r.launch.as_ref()?.readiness.clone()?;
                Some((uid.clone(), p))
            })
            .collect();
        let results =
            futures::future::join_all(targets.iter().map(|(_, p)| http_ok(p.port, &p.path))).await;
        for ((uid, p), ok) in targets.into_iter().zip(results) {
            let Some(run) = self.pods.get_mut(&uid) else {
                continue;
            };
            if ok {
                run.successes += 1;
                run.failures = 0;
            } else {
                run.failures += 1;
                run.successes = 0;
            }
            let flip = if !run.ready && run.successes >= p.success_threshold {
                Some(true)
            } else if run.ready && run.failures >= p.failure_threshold {
                Some(false)
            } else {
                None
            };
            if let Some(ready) = flip {
                run.ready = ready;
                run.ready_since = now_rfc3339();
                let name = run.name.clone();
                self.record(&name, if ready { Event::Ready } else { Event::NotReady });
            }
        }
        // A container without a readiness probe is ready once it runs.
        let mut started = Vec::new();
        for run in self.pods.values_mut() {
            let probed = run.launch.as_ref().is_some_and(|l| l.readiness.is_some());
            if !probed && run.pid.is_some() && run.kill_at.is_none() && !run.ready {
                run.ready = true;
                run.ready_since = now_rfc3339();
                started.push(run.name.clone());
            }
        }
        for name in started {
            self.record(&name, Event::Ready);
        }
    }

    /// Patches the Pod's status when it changed.
    async fn report(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        let container = self.config.container.clone();
        let Some(run) = self.pods.get(uid) else {
            return;
        };
        if run.delete_sent {
            return;
        }
        let status = run.status(&container);
        if run.reported.as_ref() == Some(&status) {
            return;
        }
        let name = run.name.clone();
        let mut patch = status.clone();
        if pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .is_none()
        {
            patch["status"]["startTime"] = json!(now_rfc3339());
        }
        let result = timed(
            &format!("patching the status of Pod {name}"),
            self.pods_api()
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)),
        )
        .await;
        match result {
            Ok(_) => {
                if let Some(run) = self.pods.get_mut(uid) {
                    run.reported = Some(status);
                }
            }
            // Deleted meanwhile: the next poll notices.
            Err(e) if e.contains("not found") => {}
            Err(e) => self.error(e),
        }
    }
}

/// `kill SIG pid` (the workspace forbids the unsafe `libc::kill`).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether `GET http://127.0.0.1:port/path` answers 200-399 within [`PROBE_TIMEOUT`].
async fn http_ok(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(buf)) => {
            let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).into_owned();
            head.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .is_some_and(|c| (200..400).contains(&c))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of the Pod the operator's Deployment makes (operator/src/build.rs).
    fn operator_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "orders-7d9f-x2", "namespace": "shop", "uid": "u-1",
                         "labels": {"team": "payments"}},
            "spec": {
                "nodeName": "test-node-shop",
                "terminationGracePeriodSeconds": 35,
                "containers": [{
                    "name": "pacer",
                    "image": "ghcr.io/pacer-dev/pacer:0.1.0",
                    "args": ["run"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "PACER_KAFKA_SECRET_0", "valueFrom": {"secretKeyRef": {"name": "kafka", "key": "password"}}},
                        {"name": "PACER_MEMBER", "value": "$(POD_NAME)"},
                        {"name": "PACER_KAFKA_CONFIG", "value": "security.protocol=SASL_SSL,sasl.password=$(PACER_KAFKA_SECRET_0)"},
                        {"name": "PACER_TOKEN_FILE", "value": "/var/run/secrets/pacer/token"},
                        {"name": "PACER_ADMIN_ADDR", "value": "0.0.0.0:9090"},
                        {"name": "PACER_TERMINATION_LOG", "value": "/dev/termination-log"},
                        {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
                        {"name": "LATER", "value": "$(DEFINED_AFTER)"},
                        {"name": "DEFINED_AFTER", "value": "x"},
                    ],
                    "ports": [{"name": "admin", "containerPort": 9090, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 5, "failureThreshold": 3},
                    "volumeMounts": [{"name": "budget-token", "mountPath": "/var/run/secrets/pacer", "readOnly": true}],
                }],
                "volumes": [{"name": "budget-token", "secret": {"secretName": "orders-budget-token", "defaultMode": 0o440}}],
            }
        }))
        .unwrap()
    }

    fn secrets() -> Secrets {
        Secrets::from([
            (
                "orders-budget-token".to_string(),
                BTreeMap::from([("token".to_string(), b"s3cret".to_vec())]),
            ),
            (
                "kafka".to_string(),
                BTreeMap::from([("password".to_string(), b"pw".to_vec())]),
            ),
        ])
    }

    fn env_of(l: &Launch) -> BTreeMap<String, String> {
        l.env.iter().cloned().collect()
    }

    #[test]
    fn the_operators_pod_runs_with_its_environment_resolved_and_rewritten() {
        let pod = operator_pod();
        assert_eq!(
            secrets_needed(&pod, "pacer"),
            BTreeSet::from(["kafka".to_string(), "orders-budget-token".to_string()])
        );
        let root = Path::new("/tmp/k/orders-7d9f-x2");
        let l = launch(&pod, "pacer", &secrets(), root, || 41234).unwrap();
        let env = env_of(&l);
        assert_eq!(env["POD_NAME"], "orders-7d9f-x2");
        assert_eq!(env["PACER_MEMBER"], "orders-7d9f-x2");
        assert_eq!(
            env["PACER_KAFKA_CONFIG"],
            "security.protocol=SASL_SSL,sasl.password=pw"
        );
        assert_eq!(
            env["PACER_TOKEN_FILE"],
            "/tmp/k/orders-7d9f-x2/volumes/budget-token/token"
        );
        assert_eq!(env["PACER_ADMIN_ADDR"], "127.0.0.1:41234");
        assert_eq!(
            env["PACER_TERMINATION_LOG"],
            "/tmp/k/orders-7d9f-x2/termination-log"
        );
        assert_eq!(l.termination_log, root.join("termination-log"));
        assert_eq!(env["TEAM"], "payments");
        // Only variables defined earlier expand.
        assert_eq!(env["LATER"], "$(DEFINED_AFTER)");
        assert_eq!(l.args, ["run"]);
        assert_eq!(
            l.files,
            [File {
                path: root.join("volumes/budget-token/token"),
                contents: b"s3cret".to_vec(),
                mode: 0o440,
            }]
        );
        assert_eq!(
            l.ports,
            [PortMap {
                name: Some("admin".into()),
                container: 9090,
                host: 41234
            }]
        );
        assert_eq!(
            l.readiness,
            Some(HttpProbe {
                path: "/readyz".into(),
                port: 41234,
                success_threshold: 1,
                failure_threshold: 3,
            })
        );
    }

    #[test]
    fn a_missing_secret_or_key_is_a_container_config_error() {
        let pod = operator_pod();
        let mut s = secrets();
        s.remove("orders-budget-token");
        let e = launch(&pod, "pacer", &s, Path::new("/r"), || 1).unwrap_err();
        assert!(e.contains("orders-budget-token"), "{e}");
        let mut s = secrets();
        s.get_mut("kafka").unwrap().clear();
        let e = launch(&pod, "pacer", &s, Path::new("/r"), || 1).unwrap_err();
        assert!(e.contains("password"), "{e}");
        let e = launch(&pod, "handler", &secrets(), Path::new("/r"), || 1).unwrap_err();
        assert!(e.contains("handler"), "{e}");
    }

    #[test]
    fn command_replaces_the_entrypoint_and_args_expand_and_rewrite() {
        let mut pod = operator_pod();
        let c = &mut pod.spec.as_mut().unwrap().containers[0];
        c.command = Some(vec!["/pacer".into(), "run".into()]);
        c.args = Some(vec![
            "--member=$(POD_NAME)".into(),
            "--admin-addr=:9090".into(),
            "--token-file".into(),
            "/var/run/secrets/pacer/token".into(),
            "$$(POD_NAME)".into(),
        ]);
        let l = launch(&pod, "pacer", &secrets(), Path::new("/r"), || 7000).unwrap();
        assert_eq!(
            l.args,
            [
                "run",
                "--member=orders-7d9f-x2",
                "--admin-addr=127.0.0.1:7000",
                "--token-file",
                "/r/volumes/budget-token/token",
                "$(POD_NAME)",
            ]
        );
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = |n: &str| (n == "A").then(|| "1".to_string());
        for (input, want) in [
            ("$(A)", "1"),
            ("x$(A)y$(A)", "x1y1"),
            ("$(B)", "$(B)"),
            ("$$(A)", "$(A)"),
            ("$$", "$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$x", "$x"),
            ("$(A", "$(A"),
            ("$(", "$("),
            ("€$(A)€", "€1€"),
            ("$€", "$€"),
            ("", ""),
        ] {
            assert_eq!(expand(input, vars), want, "{input:?}");
        }
    }

    #[test]
    fn only_local_addresses_on_container_ports_and_mount_paths_are_rewritten() {
        let mounts = vec![
            ("/etc/a/b".to_string(), PathBuf::from("/h/ab")),
            ("/etc/a".to_string(), PathBuf::from("/h/a")),
        ];
        let ports = vec![PortMap {
            name: None,
            container: 9090,
            host: 5555,
        }];
        for (input, want) in [
            ("0.0.0.0:9090", "127.0.0.1:5555"),
            ("[::]:9090", "127.0.0.1:5555"),
            (":9090", "127.0.0.1:5555"),
            ("localhost:9090", "127.0.0.1:5555"),
            ("10.0.0.1:9090", "10.0.0.1:9090"),
            ("0.0.0.0:9091", "0.0.0.0:9091"),
            ("kafka:9092", "kafka:9092"),
            ("/etc/a", "/h/a"),
            ("/etc/a/x", "/h/a/x"),
            ("/etc/a/b/y", "/h/ab/y"),
            ("/etc/ab", "/etc/ab"),
            ("--f=/etc/a/x", "--f=/h/a/x"),
            ("a=b,c=0.0.0.0:9090", "a=b,c=0.0.0.0:9090"),
        ] {
            assert_eq!(rewrite(input, &mounts, &ports), want, "{input:?}");
        }
    }

    #[test]
    fn status_reports_running_ready_and_the_last_termination() {
        let pod = operator_pod();
        let mut run = PodRun::new(&pod, "pacer", FIRST_BACKOFF);
        let s = run.status("pacer");
        assert_eq!(s["status"]["phase"], "Pending");
        run.pid = Some(42);
        run.started_at = Some("2025-01-01T00:00:00Z".into());
        run.ready = true;
        let s = run.status("pacer");
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(s["status"]["conditions"][3]["type"], "Ready");
        assert_eq!(s["status"]["conditions"][3]["status"], "True");
        assert_eq!(s["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(
            s["status"]["containerStatuses"][0]["containerID"],
            "pid://42"
        );
        // Exited, waiting to restart.
        run.pid = None;
        run.started_at = None;
        run.last_terminated = Some(Terminated {
            exit_code: 2,
            signal: None,
            started_at: "a".into(),
            finished_at: "b".into(),
            message: Some("pacer-incarnation=0f\n".into()),
        });
        run.waiting = Some(("CrashLoopBackOff".into(), "m".into()));
        run.restarts = 1;
        let s = run.status("pacer");
        let cs = &s["status"]["containerStatuses"][0];
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(s["status"]["conditions"][3]["status"], "False");
        assert_eq!(cs["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(cs["lastState"]["terminated"]["exitCode"], 2);
        assert_eq!(
            cs["lastState"]["terminated"]["message"],
            "pacer-incarnation=0f\n"
        );
        assert_eq!(cs["restartCount"], 1);
    }

    #[test]
    fn downward_api_fields() {
        let pod = operator_pod();
        assert_eq!(field_value(&pod, "metadata.namespace").unwrap(), "shop");
        assert_eq!(field_value(&pod, "metadata.uid").unwrap(), "u-1");
        assert_eq!(
            field_value(&pod, "spec.nodeName").unwrap(),
            "test-node-shop"
        );
        assert_eq!(field_value(&pod, "metadata.labels['nope']").unwrap(), "");
        assert!(field_value(&pod, "status.phase").is_err());
    }
}

//! `pacer-operator`: runs the ThrottledConsumer controller and the embedded budget
//! coordinator (`run`, the default), or prints the CRD (`crd`).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use pacer_budget::service::{self, Coordinator};
use pacer_operator::admin::{self, AdminState};
use pacer_operator::build::BuildSettings;
use pacer_operator::leader::{Election, Gate, Timing};
use pacer_operator::metrics::Metrics;
use pacer_operator::reconcile::Context;
use pacer_operator::{controller, crd};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "pacer-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ThrottledConsumer CRD as YAML.
    Crd,
    /// Run the controller and the embedded budget coordinator.
    Run(RunConfig),
    /// Print the Secret, Deployment and PodDisruptionBudget the operator would apply for
    /// a ThrottledConsumer manifest (a dry run; no cluster needed).
    Render(RenderConfig),
}

#[derive(Debug, clap::Args)]
struct RenderConfig {
    /// A ThrottledConsumer manifest (YAML).
    file: std::path::PathBuf,
    /// Default image of the replicas.
    #[arg(
        long,
        env = "PACER_OPERATOR_REPLICA_IMAGE",
        default_value = "ghcr.io/pacer-dev/pacer:latest"
    )]
    replica_image: String,
    /// URL at which replicas reach the coordinator.
    #[arg(
        long,
        env = "PACER_OPERATOR_COORDINATOR_URL",
        default_value = "http://pacer.pacer-system.svc:8080"
    )]
    coordinator_url: String,
}

#[derive(Debug, clap::Args)]
struct RunConfig {
    /// Address of the budget protocol (the replicas' coordinator).
    #[arg(
        long,
        env = "PACER_OPERATOR_COORDINATOR_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    coordinator_addr: SocketAddr,
    /// Address of /livez, /readyz and /metrics.
    #[arg(
        long,
        env = "PACER_OPERATOR_ADMIN_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    admin_addr: SocketAddr,
    /// URL at which replicas reach the coordinator, e.g.
    /// http://pacer-operator.pacer-system.svc:8080 (the chart's Service).
    #[arg(long, env = "PACER_OPERATOR_COORDINATOR_URL")]
    coordinator_url: String,
    /// Default image of the replicas (`pacer run`).
    #[arg(long, env = "PACER_OPERATOR_REPLICA_IMAGE")]
    replica_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PACER_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Seconds between status refreshes of a healthy object.
    #[arg(long, env = "PACER_OPERATOR_RESYNC_SECONDS", default_value_t = 10)]
    resync_seconds: u64,
    /// Log format.
    #[arg(long, env = "PACER_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Elect a leader with a coordination.k8s.io/v1 Lease, so several operator replicas
    /// can run: only the leader reconciles and serves the lease protocol; a standby is
    /// not Ready and answers lease requests 503 with Retry-After (src/leader.rs).
    #[arg(long, env = "PACER_OPERATOR_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Namespace of the leader Lease (the chart sets the operator's own).
    #[arg(
        long,
        env = "PACER_OPERATOR_LEADER_ELECTION_NAMESPACE",
        default_value = "default"
    )]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "PACER_OPERATOR_LEADER_ELECTION_LEASE",
        default_value = "pacer-operator"
    )]
    leader_election_lease: String,
    /// This process's identity in the Lease (the chart sets the Pod's name); a random
    /// suffix keeps a restarted process distinct.
    #[arg(
        long,
        env = "PACER_OPERATOR_IDENTITY",
        default_value = "pacer-operator"
    )]
    identity: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::Render(RenderConfig {
            file,
            replica_image,
            coordinator_url,
        }) => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let settings = BuildSettings {
                image: replica_image,
                coordinator_url,
            };
            let out = pacer_operator::build::render(&yaml, &settings)
                .with_context(|| format!("rendering {}", file.display()))?;
            print!("{out}");
            Ok(())
        }
        Command::Run(cfg) => tokio::runtime::Runtime::new()
            .context("starting the tokio runtime")?
            .block_on(run(cfg)),
    }
}

async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let RunConfig {
        coordinator_addr,
        admin_addr,
        coordinator_url,
        replica_image,
        watch_namespace,
        resync_seconds,
        log_format,
        leader_election,
        leader_election_namespace,
        leader_election_lease,
        identity,
    } = cfg;
    init_tracing(log_format);
    // First, so a SIGTERM during start-up is kept for the wait below instead of ending
    // the process (see `pacer_budget::signals`); one registration serves every wait.
    let mut terminate = pacer_budget::signals::Terminate::register()
        .context("installing the SIGTERM / SIGINT handlers")?;
    // The replicas receive this as `--coordinator`, checked by the same rule.
    if let Err(e) = pacer_rules::names::http_url(&coordinator_url) {
        bail!("--coordinator-url: {e} (the coordinator speaks plain HTTP)");
    }
    if replica_image.trim().is_empty() {
        bail!("--replica-image must not be empty");
    }
    if !(1..=3600).contains(&resync_seconds) {
        bail!("--resync-seconds {resync_seconds} is out of range, must be 1 to 3600");
    }

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));

    // One shutdown signal for all three servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let coord_listener = TcpListener::bind(coordinator_addr)
        .await
        .with_context(|| format!("binding the coordinator to {coordinator_addr}"))?;
    let admin_listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin server to {admin_addr}"))?;
    info!(%coordinator_addr, %admin_addr, "Listening");

    // The coordinator's routes are served only while this process leads.
    let gate = Gate::default();
    let coord_app = gate.router();
    let coord_stop = stopped();
    let coord_task = tokio::spawn(async move {
        axum::serve(coord_listener, coord_app)
            .with_graceful_shutdown(coord_stop)
            .await
    });
    let admin_app = admin::router(AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    let admin_stop = stopped();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(admin_stop)
            .await
    });

    let mut election = if leader_election {
        let timing = Timing::DEFAULT;
        timing.validate().map_err(anyhow::Error::msg)?;
        let api = kube::Api::namespaced(client.clone(), &leader_election_namespace);
        let me = format!("{identity}-{:08x}", rand::random::<u32>());
        let mut election = Election::new(api, &leader_election_lease, &me, timing);
        tokio::select! {
            () = election.acquire() => {}
            () = terminate.recv() => {
                info!("Shutting down while standing by");
                let _ = stop_tx.send(true);
                coord_task.await.context("coordinator task")??;
                admin_task.await.context("admin task")??;
                return Ok(());
            }
        }
        Some(election)
    } else {
        None
    };

    // Leading (or alone). The coordinator is created now, so a new leader's ledgers
    // start in learning mode: replicas keep what the old leader granted until they
    // report it.
    let coordinator = Coordinator::new();
    gate.open(service::router(coordinator.clone()));
    metrics.leader.set(1);
    let ctx = Arc::new(Context::new(
        client,
        coordinator,
        metrics.clone(),
        BuildSettings {
            image: replica_image,
            coordinator_url,
        },
        Arc::new(k8s_openapi::chrono::Utc::now),
        Duration::from_secs(resync_seconds),
    ));
    let controller_task = tokio::spawn(controller::run(
        ctx,
        watch_namespace,
        ready.clone(),
        stopped(),
    ));

    let lost = match election.as_mut() {
        Some(e) => tokio::select! {
            ended = e.keep() => Some(ended),
            () = terminate.recv() => None,
        },
        None => {
            terminate.recv().await;
            None
        }
    };
    if let Some(ended) = lost {
        // Stop granting and reconciling at once, then exit: a standby may take over
        // once the Lease has gone unrenewed for its duration.
        gate.close();
        ready.store(false, std::sync::atomic::Ordering::Release);
        metrics.leader.set(0);
        let _ = stop_tx.send(true);
        let _ = controller_task.await;
        bail!("lost the leader Lease ({ended:?}): exiting so this process restarts as a standby");
    }
    info!("Shutting down");
    let _ = stop_tx.send(true);
    controller_task.await.context("controller task")?;
    if let Some(e) = election.as_mut() {
        e.release().await;
    }
    coord_task.await.context("coordinator task")??;
    admin_task.await.context("admin task")??;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

//! Command line and environment configuration, validated before anything starts.
//!
//! Every flag of `pacer run` can also come from an environment variable, because the
//! operator configures pods through env. Per-flag checks are clap value parsers, so a bad
//! value is reported as `invalid value 'X' for '--flag': <what is accepted>` with exit
//! code 2. Checks that involve several flags live in [`RunArgs::validate`], which turns
//! the raw flags into a [`RunConfig`] (pure; no I/O except reading the token file).
//!
//! Every rule a flag shares with the ThrottledConsumer CRD or the budgets file (bounds,
//! the duration syntax, topic and group names, URLs, spellings) is `pacer_rules`', so the
//! operator never sets an env var that a replica refuses. Durations are a whole number
//! and a unit: `500ms`, `5s`, `2m`, `1h`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pacer_budget::client::ClientConfig;
use pacer_rules::duration::{self, DurationRange, RETRY_DELAY, SHUTDOWN_GRACE, TIMEOUT};
use pacer_rules::kafka::{self, topic_name};
use pacer_rules::limits::{burst, max_attempts, max_in_flight, IntRange};
use pacer_rules::names;
pub use pacer_rules::{GroupProtocol, Ordering};

/// `pacer`: one replica of a globally throttled Kafka consumer fleet.
#[derive(Debug, Parser)]
#[command(name = "pacer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume Kafka topics and deliver each message to a sink under a rate and in-flight budget.
    Run(Box<RunArgs>),
    /// Serve the lease protocol for the budgets listed in a YAML file (no Kubernetes).
    Coordinator(CoordinatorArgs),
    /// Run a local fleet on an embedded broker and print the sink rate against the budget.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "PACER_BOOTSTRAP_SERVERS", value_parser = bootstrap_servers)]
    pub bootstrap_servers: String,
    /// Topic to consume (repeatable; comma-separated in the env var).
    #[arg(long = "topic", env = "PACER_TOPICS", value_delimiter = ',', required = true, value_parser = topic)]
    pub topics: Vec<String>,
    /// Consumer group id.
    #[arg(long, env = "PACER_GROUP_ID", value_parser = group_id)]
    pub group_id: String,
    /// Extra librdkafka property `key=value` (repeatable; comma-separated in the env
    /// var; a piece without `=` continues the previous value, so `a=x,y` keeps `x,y`).
    #[arg(
        long = "kafka-config",
        env = "PACER_KAFKA_CONFIG",
        value_delimiter = ','
    )]
    pub kafka_config: Vec<String>,
    /// Consumer-group protocol: `classic` (JoinGroup/SyncGroup with the cooperative-sticky
    /// assignor, any Kafka) or `consumer` (KIP-848, Kafka 4.0+: the broker assigns and
    /// sets the session and heartbeat times).
    #[arg(long, env = "PACER_GROUP_PROTOCOL", default_value = "classic", value_parser = group_protocol)]
    pub group_protocol: GroupProtocol,

    /// Coordinator base URL (`http://host:port`); with it the budget is leased.
    #[arg(long, env = "PACER_COORDINATOR", value_parser = coordinator_url)]
    pub coordinator: Option<String>,
    /// Budget to lease from, `namespace/name`.
    #[arg(long, env = "PACER_BUDGET", value_parser = budget_id)]
    pub budget: Option<(String, String)>,
    /// File holding the budget's bearer token.
    #[arg(long, env = "PACER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This replica's member name (the pod name); defaults to $HOSTNAME.
    #[arg(long, env = "PACER_MEMBER")]
    pub member: Option<String>,

    /// Standalone rate budget in messages per second (at most 1000000), or `unlimited`.
    #[arg(long, env = "PACER_RATE", value_parser = rate, allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// Standalone in-flight budget (default 16).
    #[arg(long, env = "PACER_MAX_IN_FLIGHT", value_parser = whole_in(max_in_flight::RANGE))]
    pub max_in_flight: Option<u32>,
    /// Token-bucket burst: messages that may go at once after an idle period (raised to
    /// at least 4 ms worth of the rate, the timer's resolution).
    #[arg(long, env = "PACER_BURST", default_value_t = 1, value_parser = whole_in(burst::RANGE))]
    pub burst: u32,
    /// Ordering of deliveries.
    #[arg(long, env = "PACER_ORDERING", default_value_t = Ordering::None, value_parser = ordering())]
    pub ordering: Ordering,
    /// Most messages buffered ahead of the dispatcher: fetching stops at this bound, and
    /// the assigned partitions are paused if the buffer stays full.
    #[arg(long, env = "PACER_BUFFER_MESSAGES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub buffer_messages: u32,
    /// Most bytes (keys, values, headers) buffered ahead of the dispatcher, as above;
    /// the message that reaches the bound is still taken, so it is exceeded by less than
    /// one message.
    #[arg(long, env = "PACER_BUFFER_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=(1u64 << 40)))]
    pub buffer_bytes: u64,

    /// Where messages go: `http://HOST:PORT/PATH`, `kafka:TOPIC`, `stdout` or `null`.
    #[arg(long, env = "PACER_SINK", value_parser = sink)]
    pub sink: SinkSpec,
    /// Timeout of one sink call (`500ms`, `5s`, `1m`; at most 24h).
    #[arg(long, env = "PACER_TIMEOUT", default_value = "5s", value_parser = duration_in(TIMEOUT))]
    pub timeout: Duration,
    /// Attempts before a failing message goes to the dead-letter topic.
    #[arg(long, env = "PACER_MAX_ATTEMPTS", default_value_t = 5, value_parser = whole_in(max_attempts::RANGE))]
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt.
    #[arg(long, env = "PACER_RETRY_INITIAL_DELAY", default_value = "100ms", value_parser = duration_in(RETRY_DELAY))]
    pub retry_initial_delay: Duration,
    /// Largest retry delay.
    #[arg(long, env = "PACER_RETRY_MAX_DELAY", default_value = "10s", value_parser = duration_in(RETRY_DELAY))]
    pub retry_max_delay: Duration,
    /// Topic for messages that failed permanently; without it they are retried forever.
    #[arg(long, env = "PACER_DEAD_LETTER_TOPIC", value_parser = topic)]
    pub dead_letter_topic: Option<String>,
    /// How long shutdown and partition revocation wait for in-flight work (at most 1h).
    #[arg(long, env = "PACER_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration_in(SHUTDOWN_GRACE))]
    pub shutdown_grace: Duration,
    /// Admin HTTP address (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "PACER_ADMIN_ADDR", default_value = "0.0.0.0:9090", value_parser = socket_addr)]
    pub admin_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "PACER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// File to write this run's id to at start, for a leased replica: Kubernetes'
    /// container termination message (`/dev/termination-log`, set by the operator), so
    /// that when the kubelet reports the container terminated the operator gives its
    /// share to the others at once instead of after the lease and fallback window.
    #[arg(long, env = "PACER_TERMINATION_LOG")]
    pub termination_log: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to serve the lease protocol on.
    #[arg(long, env = "PACER_LISTEN", default_value = "0.0.0.0:8080", value_parser = socket_addr)]
    pub listen: SocketAddr,
    /// YAML file listing the budgets (re-read on SIGHUP).
    #[arg(long, env = "PACER_BUDGETS")]
    pub budgets: PathBuf,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Global budget in messages per second.
    #[arg(long, default_value_t = 200.0, value_parser = rate)]
    pub budget: f64,
    /// Global in-flight budget (requests the sink may hold at once).
    #[arg(long, default_value_t = 8, value_parser = whole_in(max_in_flight::RANGE))]
    pub in_flight: u32,
    /// The most replicas the story scales to (it goes 1 -> half -> this -> 2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=32))]
    pub replicas: u32,
    /// Seconds the story takes (the drain comes after).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(20..=3600))]
    pub duration: u64,
    /// Partitions of the demo topic (at least `--replicas`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub partitions: u32,
    /// The sink's time per request, in milliseconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub sink_latency_ms: u64,
    /// Where to write the per-second records, totals, events and verdict (JSON).
    #[arg(long, default_value = "pacer-demo.json")]
    pub json: PathBuf,
    /// Where to draw the rates against the budget (SVG).
    #[arg(long, default_value = "pacer-demo.svg")]
    pub plot: PathBuf,
}

/// Where delivered messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    Http(String),
    Kafka(String),
    Stdout,
    Null,
}

impl fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkSpec::Http(url) => f.write_str(url),
            SinkSpec::Kafka(t) => write!(f, "kafka:{t}"),
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::Null => f.write_str("null"),
        }
    }
}

/// Where the budget comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Budget {
    /// Fixed limits; `rate` may be infinite (`--rate unlimited`).
    Standalone { rate: f64, in_flight: u32 },
    /// Leased from a coordinator.
    Leased { client: ClientConfig },
}

/// Retry policy of the worker (see [`crate::outcome`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

/// A validated `pacer run` configuration.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub bootstrap_servers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub kafka_config: Vec<(String, String)>,
    pub group_protocol: GroupProtocol,
    pub budget: Budget,
    pub burst: u32,
    pub ordering: Ordering,
    pub buffer_messages: usize,
    pub buffer_bytes: usize,
    pub sink: SinkSpec,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub dead_letter_topic: Option<String>,
    pub shutdown_grace: Duration,
    pub admin_addr: Option<SocketAddr>,
    /// See [`RunArgs::termination_log`].
    pub termination_log: Option<std::path::PathBuf>,
}

/// A configuration that names flags in a way clap alone cannot check.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value for '{flag}': {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("cannot read '--token-file' {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

impl RunArgs {
    /// Checks the rules that span several flags and builds the [`RunConfig`].
    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        // Destructured so that a new flag that is not used here fails to compile.
        let RunArgs {
            bootstrap_servers,
            topics,
            group_id,
            kafka_config,
            group_protocol,
            coordinator,
            budget,
            token_file,
            member,
            rate,
            max_in_flight,
            burst,
            ordering,
            buffer_messages,
            buffer_bytes,
            sink,
            timeout,
            max_attempts,
            retry_initial_delay,
            retry_max_delay,
            dead_letter_topic,
            shutdown_grace,
            admin_addr,
            log_format: _,
            termination_log,
        } = self;

        let budget = budget_of(coordinator, budget, token_file, member, rate, max_in_flight)?;
        duration::retry_delays(retry_initial_delay, retry_max_delay, "'--retry-max-delay'")
            .map_err(|e| invalid("--retry-initial-delay", e))?;
        let kafka_config =
            parse_kafka_config(&kafka_config).map_err(|m| invalid("--kafka-config", m))?;
        if let Some((k, why)) = kafka_config.iter().find_map(|(k, _)| {
            pacer_rules::refused_kafka_property(k, group_protocol).map(|why| (k, why))
        }) {
            return Err(invalid(
                "--kafka-config",
                format!("'{k}' {why} (with --group-protocol {group_protocol})"),
            ));
        }
        Ok(RunConfig {
            bootstrap_servers,
            topics,
            group_id,
            kafka_config,
            group_protocol,
            budget,
            burst,
            ordering,
            buffer_messages: buffer_messages as usize,
            buffer_bytes: usize::try_from(buffer_bytes).unwrap_or(usize::MAX),
            sink,
            timeout,
            retry: RetryPolicy {
                max_attempts,
                initial_delay: retry_initial_delay,
                max_delay: retry_max_delay,
            },
            dead_letter_topic,
            shutdown_grace,
            admin_addr: Some(admin_addr),
            termination_log,
        })
    }
}

/// Where the budget comes from: `--rate` (standalone) or `--coordinator` with its
/// `--budget`, `--token-file` and `--member`.
fn budget_of(
    coordinator: Option<String>,
    budget: Option<(String, String)>,
    token_file: Option<PathBuf>,
    member: Option<String>,
    rate: Option<f64>,
    max_in_flight: Option<u32>,
) -> Result<Budget, ConfigError> {
    match (coordinator, rate) {
        (Some(_), Some(_)) => Err(invalid(
            "--rate",
            "a standalone rate cannot be combined with '--coordinator'; pass one of them",
        )),
        (None, None) => Err(invalid(
            "--rate",
            "missing: pass '--rate N' (standalone) or '--coordinator URL --budget NS/NAME --token-file PATH'",
        )),
        (None, Some(rate)) => Ok(Budget::Standalone {
            rate,
            in_flight: max_in_flight.unwrap_or(16),
        }),
        (Some(base_url), None) => {
            let (namespace, name) = budget.ok_or_else(|| {
                invalid("--budget", "missing: '--coordinator' needs '--budget NS/NAME'")
            })?;
            let path = token_file.ok_or_else(|| {
                invalid(
                    "--token-file",
                    "missing: '--coordinator' needs '--token-file PATH'",
                )
            })?;
            let token = std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::TokenFile {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string();
            if token.is_empty() {
                return Err(invalid("--token-file", format!("{} is empty", path.display())));
            }
            let member = member
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_default();
            names::member_name(&member).map_err(|e| {
                invalid(
                    "--member",
                    format!("{member:?}: {e} (set --member or $HOSTNAME)"),
                )
            })?;
            Ok(Budget::Leased {
                client: ClientConfig {
                    base_url,
                    namespace,
                    name,
                    token,
                    member,
                },
            })
        }
    }
}

/// A clap parser for a whole number in one of the shared ranges.
fn whole_in(range: IntRange) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync {
    // Every shared range lies within 1..=100000, so the value fits.
    move |s| range.parse(s).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// A clap parser for a duration in one of the shared ranges.
fn duration_in(
    range: DurationRange,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| range.check(s)
}

/// `--ordering`, listing the shared spellings in `--help` and in errors.
fn ordering() -> impl TypedValueParser<Value = Ordering> {
    PossibleValuesParser::new(Ordering::NAMES.iter().copied())
        .map(|name| name.parse::<Ordering>().expect("a listed name parses"))
}

// Names are trimmed first: the env vars are comma-separated lists that people write
// with a space after each comma.

fn bootstrap_servers(s: &str) -> Result<String, String> {
    kafka::bootstrap_servers(s)?;
    Ok(s.trim().to_string())
}

fn topic(s: &str) -> Result<String, String> {
    topic_name(s.trim())?;
    Ok(s.trim().to_string())
}

fn group_id(s: &str) -> Result<String, String> {
    kafka::group_id(s.trim())?;
    Ok(s.trim().to_string())
}

/// Turns `--kafka-config` pieces (split at commas by clap) into properties. librdkafka
/// values may contain commas (`partition.assignment.strategy=range,roundrobin`), so a
/// piece that does not start with `key=` continues the previous value.
pub fn parse_kafka_config(pieces: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for piece in pieces {
        let new_key = piece
            .split_once('=')
            .filter(|(k, _)| kafka::property_name(k.trim()).is_ok());
        match (new_key, out.last_mut()) {
            (Some((k, v)), _) => out.push((k.trim().to_string(), v.trim().to_string())),
            (None, Some((_, v))) => {
                v.push(',');
                v.push_str(piece.trim());
            }
            (None, None) => {
                return Err(format!(
                    "'{piece}': expected a librdkafka property as key=value"
                ))
            }
        }
    }
    Ok(out)
}

fn group_protocol(s: &str) -> Result<GroupProtocol, String> {
    s.parse()
}

fn coordinator_url(s: &str) -> Result<String, String> {
    names::http_url(s).map_err(|e| format!("{e} (the coordinator speaks plain HTTP)"))?;
    Ok(s.trim_end_matches('/').to_string())
}

fn budget_id(s: &str) -> Result<(String, String), String> {
    let (namespace, name) = s.split_once('/').ok_or("expected NAMESPACE/NAME")?;
    names::budget_name(namespace).map_err(|e| format!("namespace {e}"))?;
    names::budget_name(name).map_err(|e| format!("name {e}"))?;
    Ok((namespace.to_string(), name.to_string()))
}

/// Accepts the shared rate bounds or `unlimited` (returned as infinity).
pub fn rate(s: &str) -> Result<f64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(f64::INFINITY);
    }
    let value = s
        .parse::<f64>()
        .map_err(|_| format!("{s:?} is not a number of messages per second, or 'unlimited'"))?;
    pacer_rules::limits::rate::check(value).map_err(|e| format!("{e}, or 'unlimited'"))
}

fn sink(s: &str) -> Result<SinkSpec, String> {
    let accepted = "expected http://HOST:PORT/PATH, kafka:TOPIC, stdout or null";
    match s {
        "stdout" => Ok(SinkSpec::Stdout),
        "null" => Ok(SinkSpec::Null),
        _ if s.starts_with("http://") => {
            names::http_url(s).map_err(|e| format!("{e}; {accepted}"))?;
            // The shared rule is what a regular expression and the operator can check;
            // the HTTP client that will use the URL has the last word.
            reqwest::Url::parse(s).map_err(|e| format!("{accepted} ({e})"))?;
            Ok(SinkSpec::Http(s.to_string()))
        }
        _ => match s.strip_prefix("kafka:") {
            Some(t) => {
                topic_name(t).map_err(|e| format!("{e}; {accepted}"))?;
                Ok(SinkSpec::Kafka(t.to_string()))
            }
            None => Err(accepted.into()),
        },
    }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected IP:PORT such as 0.0.0.0:9090".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pacer").chain(args.iter().copied()))
    }

    const BASE: &[&str] = &[
        "run",
        "--bootstrap-servers",
        "k:9092",
        "--topic",
        "t",
        "--group-id",
        "g",
        "--sink",
        "null",
    ];

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let args: Vec<&str> = BASE.iter().chain(extra).copied().collect();
        match parse(&args)?.command {
            Command::Run(r) => Ok(*r),
            _ => unreachable!(),
        }
    }

    #[test]
    fn durations_take_the_crds_syntax_and_bounds() {
        let c = run_args(&[
            "--rate",
            "5",
            "--timeout",
            "250ms",
            "--shutdown-grace",
            "1h",
        ])
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.shutdown_grace, Duration::from_secs(3600));
        for (flag, bad) in [
            ("--timeout", "3"),
            ("--timeout", "1.5s"),
            ("--timeout", "0s"),
            ("--timeout", "25h"),
            ("--shutdown-grace", "61m"),
            ("--retry-max-delay", "5x"),
        ] {
            let err = run_args(&["--rate", "5", flag, bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(flag) && err.contains("like 500ms, 5s or 1m, at most"),
                "{flag} {bad}: {err}"
            );
        }
    }

    #[test]
    fn shared_bounds_are_refused_naming_the_flag_and_the_range() {
        for (flag, bad, range) in [
            ("--burst", "10001", "must be 1 to 10000"),
            ("--max-attempts", "0", "must be 1 to 1000"),
            ("--max-in-flight", "100001", "must be 1 to 100000"),
            ("--topic", "orders/dlq", "is not a Kafka topic name"),
            (
                "--budget",
                "Shop/orders",
                "namespace must be 1 to 253 characters",
            ),
        ] {
            let err = run_args(&["--rate", "5", flag, bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(flag) && err.contains(range),
                "{flag} {bad}: {err}"
            );
        }
    }

    #[test]
    fn a_negative_rate_is_refused_naming_the_flag_the_value_and_the_range() {
        let err = run_args(&["--rate", "-5"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(text.contains("--rate"), "{text}");
        assert!(text.contains("-5"), "{text}");
        assert!(text.contains("greater than 0"), "{text}");
        let text = run_args(&["--rate", "1000001"]).unwrap_err().to_string();
        assert!(text.contains("at most 1000000, or 'unlimited'"), "{text}");
    }

    #[test]
    fn an_unknown_sink_is_refused_listing_the_accepted_forms() {
        let args: Vec<&str> = BASE[..BASE.len() - 1]
            .iter()
            .copied()
            .chain(["ftp://x", "--rate", "5"])
            .collect();
        let text = parse(&args).unwrap_err().to_string();
        assert!(
            text.contains("ftp://x") && text.contains("kafka:TOPIC"),
            "{text}"
        );
    }

    #[test]
    fn rate_and_coordinator_together_are_refused() {
        let err = run_args(&["--rate", "5", "--coordinator", "http://c:8080"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--rate"), "{err}");
    }

    #[test]
    fn a_standalone_config_defaults_to_sixteen_in_flight_and_unordered() {
        let c = run_args(&["--rate", "unlimited"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            c.budget,
            Budget::Standalone {
                rate: f64::INFINITY,
                in_flight: 16
            }
        );
        assert_eq!(c.ordering, Ordering::None);
    }

    #[test]
    fn a_coordinator_config_becomes_the_budget_clients_config_with_the_token_trimmed() {
        let path = std::env::temp_dir().join(format!("pacer-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let c = run_args(&[
            "--coordinator",
            "http://c:8080/",
            "--budget",
            "ns/b",
            "--token-file",
            path.to_str().unwrap(),
            "--member",
            "pod-0",
        ])
        .unwrap()
        .validate();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            c.unwrap().budget,
            Budget::Leased {
                client: ClientConfig {
                    base_url: "http://c:8080".into(),
                    namespace: "ns".into(),
                    name: "b".into(),
                    token: "s3cret".into(),
                    member: "pod-0".into(),
                }
            }
        );
    }

    #[test]
    fn kafka_config_refuses_the_offset_store_switch() {
        let err = run_args(&[
            "--rate",
            "5",
            "--kafka-config",
            "enable.auto.offset.store=true",
        ])
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(
            err.to_string().contains("enable.auto.offset.store"),
            "{err}"
        );
    }

    #[test]
    fn the_consumer_group_protocol_refuses_client_side_group_timings() {
        let args = |protocol: &str| {
            run_args(&[
                "--rate",
                "5",
                "--group-protocol",
                protocol,
                "--kafka-config",
                "session.timeout.ms=6000",
            ])
            .unwrap()
            .validate()
        };
        let c = args("classic").unwrap();
        assert_eq!(c.group_protocol, GroupProtocol::Classic);
        let err = args("consumer").unwrap_err().to_string();
        assert!(
            err.contains("--kafka-config")
                && err.contains("session.timeout.ms")
                && err.contains("--group-protocol consumer"),
            "{err}"
        );
        let err = run_args(&["--rate", "5", "--group-protocol", "eager"]).unwrap_err();
        assert!(err.to_string().contains("classic, consumer"), "{err}");
    }

    #[test]
    fn kafka_config_values_may_contain_commas() {
        let pieces: Vec<String> =
            "partition.assignment.strategy=range,roundrobin,fetch.max.bytes=1"
                .split(',')
                .map(str::to_string)
                .collect();
        assert_eq!(
            parse_kafka_config(&pieces).unwrap(),
            vec![
                (
                    "partition.assignment.strategy".into(),
                    "range,roundrobin".into()
                ),
                ("fetch.max.bytes".into(), "1".into()),
            ]
        );
        assert!(parse_kafka_config(&["novalue".into()]).is_err());
    }

    #[test]
    fn a_retry_initial_delay_above_the_maximum_is_refused() {
        let err = run_args(&["--rate", "5", "--retry-initial-delay", "20s"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--retry-initial-delay"), "{err}");
    }
}

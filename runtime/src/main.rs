//! `pacer`: `run` (one replica), `coordinator` (standalone lease service), `demo`.
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure, 2 invalid configuration, 130 a
//! second signal during shutdown.

#![deny(clippy::too_many_lines)]

use std::process::ExitCode;

use clap::Parser;
use pacer_runtime::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// Messages are allocated on the Kafka thread and freed on the tokio workers; glibc's
/// malloc serialised those cross-thread frees on an arena lock (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(format: LogFormat, default: &str) {
    // librdkafka's own log lines come through `rdkafka` at info; keep them at warn.
    let filter = EnvFilter::try_from_env("PACER_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_tracing(args.log_format, "info,rdkafka=warn");
            let config = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let registered = {
                let _in_runtime = rt.enter();
                pacer_runtime::shutdown_signal()
            };
            let shutdown = match registered {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot install the SIGTERM / SIGINT handlers: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(pacer_runtime::run(config, shutdown)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "Replica failed");
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Coordinator(args) => {
            init_tracing(LogFormat::Text, "info");
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(pacer_budget::standalone::run(args.listen, args.budgets)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo(args) => {
            // The demo prints its own table on stdout; logs only for problems.
            init_tracing(LogFormat::Text, "warn");
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(pacer_runtime::demo::run(args)) {
                Ok(v) if v.pass => ExitCode::SUCCESS,
                // The verdict line says what failed.
                Ok(_) => ExitCode::from(3),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

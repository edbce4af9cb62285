//! `pacer coordinator`: the coordinator served from a budgets file, for use without
//! Kubernetes. SIGHUP re-reads the file (a live budget change); a file that fails to
//! parse on reload is logged and the running budgets are kept. SIGTERM or ctrl-c stops.

use crate::file::{self, FileError};
use crate::service::{self, Coordinator};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot read budgets file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("budgets file {path}: {source}")]
    ParseFile { path: PathBuf, source: FileError },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Reads and validates the budgets file, then applies it to `coord`.
pub fn load(path: &Path, coord: &Coordinator) -> Result<usize, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let entries = file::parse(&text).map_err(|source| StandaloneError::ParseFile {
        path: path.to_path_buf(),
        source,
    })?;
    let n = entries.len();
    coord.replace_all(
        entries
            .into_iter()
            .map(|e| (e.id, e.config, e.token))
            .collect(),
    );
    Ok(n)
}

/// Runs the standalone coordinator until SIGTERM or ctrl-c.
pub async fn run(listen: SocketAddr, budgets: PathBuf) -> Result<(), StandaloneError> {
    // Before anything else: a SIGHUP or SIGTERM during start-up must not take the
    // signal's default action (the end of the process).
    let mut hup = crate::signals::hangup().map_err(StandaloneError::Signals)?;
    let mut term = crate::signals::Terminate::register().map_err(StandaloneError::Signals)?;
    let coord = Coordinator::new();
    let n = load(&budgets, &coord)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StandaloneError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(StandaloneError::Serve)?;
    tracing::info!(addr = %local, budgets = n, file = %budgets.display(), "Coordinator listening");

    let reloader = {
        let coord: Arc<Coordinator> = coord.clone();
        let path = budgets.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match load(&path, &coord) {
                    Ok(n) => tracing::info!(budgets = n, "Budgets file reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "Budgets file reload failed; keeping the running budgets")
                    }
                }
            }
        })
    };
    let shutdown = async move {
        term.recv().await;
        tracing::info!("Coordinator stopping");
    };
    let result = service::serve(listener, coord, shutdown).await;
    reloader.abort();
    result.map_err(StandaloneError::Serve)
}

//! Termination signals, registered when asked for rather than when first awaited.
//!
//! Tokio installs a process's handler for a signal only when a [`Signal`] stream for it
//! is created. A `shutdown` future that creates its streams on its first poll leaves a
//! window in start-up (between spawning and the first poll) where SIGTERM still has its
//! default action and kills the process with no drain and no clean exit. Every `pacer`
//! process (replica, standalone coordinator, operator) registers its signals with
//! [`Terminate::register`] first, so a SIGTERM at any point after that is kept for the
//! next [`Terminate::recv`] (a stream keeps one pending notification).

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM and SIGINT, registered at creation.
#[derive(Debug)]
pub struct Terminate {
    term: Signal,
    int: Signal,
}

impl Terminate {
    /// Installs the handlers now. Must be called inside a tokio runtime (its reactor
    /// owns the handlers); an error means the process cannot catch the signals.
    pub fn register() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT, including one that arrived since the last
    /// call (or since [`Terminate::register`]). Cancel-safe: a `select!` may drop it.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGHUP, registered at creation: the standalone coordinator reloads on it, and an
/// unregistered SIGHUP would end the process (its default action).
pub fn hangup() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(sig: i32) {
        // `kill(1)` to our own pid, as a supervisor would send it.
        let me = std::process::id();
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(me.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// A SIGTERM sent after registering and before anyone awaits is kept, not fatal:
    /// without the handler, the default action would end this test process.
    #[tokio::test]
    async fn a_sigterm_before_the_first_wait_is_kept_for_it() {
        let mut t = Terminate::register().unwrap();
        raise(15);
        tokio::time::timeout(std::time::Duration::from_secs(10), t.recv())
            .await
            .expect("the SIGTERM sent before the wait is received");
    }

    #[tokio::test]
    async fn a_sighup_after_registering_is_received_not_fatal() {
        let mut hup = hangup().unwrap();
        raise(1);
        tokio::time::timeout(std::time::Duration::from_secs(10), hup.recv())
            .await
            .expect("the SIGHUP is received");
    }
}

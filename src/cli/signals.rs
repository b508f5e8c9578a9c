//! SIGINT and SIGTERM as one stream, installed before the slow part of a
//! command so a signal during start-up is a clean stop, not a default death.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM (each signal is seen once).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT: stopping"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM: stopping"),
        }
    }
}

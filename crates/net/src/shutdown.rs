//! Shutdown: a [`ShutdownTrigger`] fires, every [`Shutdown`] clone sees it; [`Drain`] tracks the
//! connection tasks and waits for them (bounded by a grace period); [`os_signal`] waits for
//! SIGINT/SIGTERM.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Result;

/// Fires the shutdown. Dropping every trigger counts as firing it.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    tx: Arc<watch::Sender<bool>>,
}

/// Sees the shutdown; cheap to clone, one per task.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    /// Only set by [`Shutdown::never`]: keeps its channel open.
    _keep: Option<Arc<watch::Sender<bool>>>,
}

/// A connected trigger and receiver.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (
        ShutdownTrigger { tx: Arc::new(tx) },
        Shutdown { rx, _keep: None },
    )
}

impl ShutdownTrigger {
    /// Start the shutdown (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Another receiver.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
            _keep: None,
        }
    }
}

impl Shutdown {
    /// A receiver that never fires (for tests and one-shot tools).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            rx,
            _keep: Some(Arc::new(tx)),
        }
    }

    /// True once the shutdown was triggered (or every trigger dropped).
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once the shutdown is triggered (or every trigger dropped). Cancel-safe.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            // An error means every sender is gone: that is a shutdown too.
            let _ = rx.wait_for(|down| *down).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere). Fails if the handlers cannot be installed.
pub async fn os_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}

/// Tracks spawned connection tasks so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Drain {
    tasks: JoinSet<()>,
}

impl Drain {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawn a tracked task.
    pub fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
        self.reap();
    }

    /// Forget the tasks that already finished (keeps the set bounded by the running tasks).
    pub fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "connection task panicked");
            }
        }
    }

    /// Tasks still tracked (running, or finished and not reaped yet).
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is tracked.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Wait for every task, at most `grace`; the ones still running then are aborted. Returns how
    /// many were aborted.
    pub async fn wait(mut self, grace: Duration) -> usize {
        let all_done = async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "connection task panicked");
                }
            }
        };
        if tokio::time::timeout(grace, all_done).await.is_ok() {
            return 0;
        }
        let left = self.tasks.len();
        self.tasks.shutdown().await;
        left
    }
}

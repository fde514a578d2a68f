//! Group commit: one flusher thread makes writes durable for every caller waiting at once.
//!
//! sled 0.34's own `flush_async` deadlocks when many tasks flush concurrently while others
//! write (sled issue #1308; seen here with 20 SMTP sessions). Instead, callers bump a
//! request counter and wait; a dedicated thread runs the blocking `Db::flush` and then
//! publishes how far it got. Every request made before a flush started is covered by it,
//! so N concurrent acknowledgements cost one disk sync, not N.

use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

use crate::{Error, Result};

/// What the flusher has finished: requests up to `through` are durable, unless the flush
/// that covered them failed with `error`.
#[derive(Debug, Clone, Default)]
struct Done {
    through: u64,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Requests {
    /// Requests made so far (a counter, not a queue).
    made: u64,
    /// The database to flush; `None` once the last [`Store`](crate::Store) handle is gone,
    /// which stops the thread.
    db: Option<sled::Db>,
}

#[derive(Debug)]
struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    done: watch::Sender<Done>,
}

/// Owned by the store handles; dropping the last one stops the flusher.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Result<Self> {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests {
                made: 0,
                db: Some(db),
            }),
            wake: Condvar::new(),
            done: watch::Sender::new(Done::default()),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("dshare-flush".into())
            .spawn(move || flusher(&thread_shared))
            .map_err(|e| Error::Transaction(format!("cannot start the flusher: {e}")))?;
        Ok(Self { shared })
    }

    /// Waits until every write made before this call is on disk.
    pub(crate) async fn flush(&self) -> Result<()> {
        let ticket = {
            let mut r = self.lock();
            r.made += 1;
            r.made
        };
        self.shared.wake.notify_one();
        let mut rx = self.shared.done.subscribe();
        let done = rx
            .wait_for(|d| d.through >= ticket)
            .await
            .map_err(|_| Error::Transaction("the flusher stopped".into()))?
            .clone();
        match done.error {
            Some(e) => Err(Error::Transaction(format!("flush failed: {e}"))),
            None => Ok(()),
        }
    }

    /// The error of the latest flush, if it failed. sled 0.34 keeps the first write error
    /// of its log for good (every later write and flush fails with it) until the database
    /// is opened again, so a failure seen here lasts.
    pub(crate) fn failure(&self) -> Option<String> {
        self.shared.done.borrow().error.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Requests> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.lock().db = None;
        self.shared.wake.notify_one();
    }
}

fn flusher(shared: &Shared) {
    let mut through = 0;
    loop {
        let (target, db) = {
            let mut r = shared.requests.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match &r.db {
                    None => return,
                    Some(db) if r.made > through => break (r.made, db.clone()),
                    Some(_) => {}
                }
                r = shared.wake.wait(r).unwrap_or_else(|p| p.into_inner());
            }
        };
        let error = db.flush().err().map(|e| e.to_string());
        drop(db);
        if let Some(e) = &error {
            tracing::error!(error = %e, "database flush failed");
        }
        through = target;
        shared.done.send_replace(Done { through, error });
    }
}

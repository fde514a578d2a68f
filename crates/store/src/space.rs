//! The free-space reserve on the data disk (Postfix's `queue_minfree`, #13 point 19): below
//! it new mail is refused with a temporary error while reads go on, and writes resume by
//! themselves once space returns (every check asks the file system again, no restart).
//!
//! The check is `statvfs(2)` of the data directory: the blocks free for unprivileged users
//! (`f_bavail`), times the fragment size.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Default reserve of a node (`limits.min_free_space`).
pub const DEFAULT_MIN_FREE_SPACE: u64 = 100 * 1024 * 1024;

/// The reserve of one store; shared by its clones.
#[derive(Debug)]
pub(crate) struct SpaceReserve {
    dir: PathBuf,
    min_free: AtomicU64,
    /// Poked when a check finds the disk below the reserve, so that the files of released
    /// bodies are deleted now rather than at the reaper's next round.
    short: tokio::sync::Notify,
}

impl SpaceReserve {
    /// No reserve until [`SpaceReserve::set`] (a node sets its configured one at start).
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            min_free: AtomicU64::new(0),
            short: tokio::sync::Notify::new(),
        }
    }

    pub(crate) fn set(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Returns once a check has found the disk below the reserve (at once if one did since
    /// the last call).
    pub(crate) async fn short(&self) {
        self.short.notified().await;
    }

    /// Bytes free for this process on the data disk.
    pub(crate) fn free(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// `DiskFull` when the free space is below the reserve. A file system that cannot say
    /// how full it is does not stop mail (logged).
    pub(crate) fn check(&self) -> Result<()> {
        let reserve = self.get();
        if reserve == 0 {
            return Ok(());
        }
        match self.free() {
            Ok(free) if free < reserve => {
                self.short.notify_one();
                Err(Error::DiskFull { free, reserve })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free space");
                Ok(())
            }
        }
    }
}

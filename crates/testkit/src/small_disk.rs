//! A small real file system for disk-full tests: a tmpfs of a given size mounted on a
//! temporary directory, unmounted on drop. Mounting needs root (CI runs as root); where it
//! is refused, [`SmallDisk::mount`] says loudly that the caller's test is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size_mib` MiB, or `None` (after a SKIPPED line on stderr) when
    /// this process may not mount.
    pub fn mount(size_mib: u64) -> std::io::Result<Option<SmallDisk>> {
        let dir = tempfile::tempdir()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); this disk-full test did not run"
            );
            return Ok(None);
        }
        Ok(Some(SmallDisk { dir }))
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A directory for a node's data on the small disk.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Bytes free on the small disk.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(self.dir.path())
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Fills the disk to the last block with a file of its own, as another program would;
    /// returns the file (remove it to give the space back).
    pub fn fill(&self) -> std::io::Result<PathBuf> {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        // `write_all` writes what fits before it fails: the last chunk fills the last block.
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

//! One orderer per `certs_dir`: replicas sharing the directory (a shared volume) must not
//! order the same certificate at once. The others see the result through the file watch.
//!
//! An exclusive-create lock file works on every filesystem that a shared volume is likely to
//! be (unlike `flock` on some NFS setups). A holder that died leaves a stale file, which is
//! taken over once it is older than [`STALE`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Longer than any order may take (orders are bounded well below this).
pub const STALE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path} is held by {holder}")]
    Held { path: PathBuf, holder: String },
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(".acme.lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    let _ = writeln!(f, "pid {} on {}", std::process::id(), host.trim());
                    return Ok(DirLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok());
                    if age.is_some_and(|a| a > STALE) {
                        tracing::warn!(lock = %path.display(), "taking over a stale ACME lock");
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(LockError::Held {
                        holder: holder.trim().to_owned(),
                        path,
                    });
                }
                Err(source) => return Err(LockError::Io { path, source }),
            }
        }
        Err(LockError::Held {
            holder: "another process".into(),
            path,
        })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let second = DirLock::acquire(dir.path()).unwrap_err();
        assert!(second.to_string().contains("held by pid"), "{second}");
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}

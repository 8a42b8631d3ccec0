//! One orderer per `certs_dir`: replicas sharing the directory (a shared volume) must not
//! order the same certificate at once. The others see the result through the file watch.
//!
//! An exclusive-create lock file works on every filesystem that a shared volume is likely to
//! be (unlike `flock` on some NFS setups). It holds a random nonce: only the holder that
//! wrote it removes it. While held, a thread touches it every [`REFRESH`]; a holder that died
//! stops doing so, and its file is taken over once it is [`STALE`] (30 s without a refresh,
//! not the length of an order).
//!
//! Approximations: a take-over reads, removes and re-creates, so two replicas that find the
//! same stale file in the same instant may both remove it, and the slower one may remove the
//! faster one's fresh lock; the owner check on release is likewise a read then a remove.
//! Both windows are a few system calls wide, after 30 s of silence.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// A lock not refreshed for this long belongs to a holder that is gone.
pub const STALE: Duration = Duration::from_secs(30);
/// How often the holder touches its lock: well inside [`STALE`], even on a loaded machine.
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    nonce: String,
    /// Dropping it stops the refresher thread.
    _refresher: Option<mpsc::Sender<()>>,
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

/// Whether the lock file at `path` is still the one holding `nonce`.
fn owns(path: &Path, nonce: &str) -> bool {
    std::fs::read_to_string(path)
        .is_ok_and(|t| t.lines().next() == Some(&format!("nonce {nonce}")[..]))
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        DirLock::acquire_with(dir, REFRESH)
    }

    fn acquire_with(dir: &Path, refresh: Duration) -> Result<DirLock, LockError> {
        let path = dir.join(".acme.lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let nonce = format!("{:032x}", fastrand::u128(..));
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    let written = writeln!(
                        f,
                        "nonce {nonce}\npid {} on {}",
                        std::process::id(),
                        host.trim()
                    )
                    .and_then(|()| f.sync_all());
                    if let Err(source) = written {
                        let _ = std::fs::remove_file(&path);
                        return Err(LockError::Io { path, source });
                    }
                    let refresher = spawn_refresher(path.clone(), nonce.clone(), refresh);
                    return Ok(DirLock {
                        path,
                        nonce,
                        _refresher: refresher,
                    });
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
                    let holder = holder
                        .lines()
                        .find(|l| !l.starts_with("nonce "))
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    return Err(LockError::Held { holder, path });
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

/// Touches the lock every `every` until the sender is dropped, or the lock is no longer ours.
fn spawn_refresher(path: PathBuf, nonce: String, every: Duration) -> Option<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("acme-lock".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if !owns(&path, &nonce) {
                    tracing::warn!(lock = %path.display(), "the ACME lock was taken over");
                    return;
                }
                let touched = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                if let Err(e) = touched {
                    tracing::warn!(lock = %path.display(), error = %e, "cannot refresh the ACME lock");
                }
            }
        });
    match spawned {
        Ok(_) => Some(stop),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the ACME lock refresher");
            None
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if owns(&self.path, &self.nonce) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, by: Duration) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let second = DirLock::acquire(dir.path()).unwrap_err();
        assert!(second.to_string().contains("held by pid"), "{second}");
        assert!(!second.to_string().contains("nonce"), "{second}");
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn stale_after_30_seconds_without_a_refresh_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".acme.lock");
        // a holder that stopped refreshing (its refresher sleeps past the test)
        let first = DirLock::acquire_with(dir.path(), Duration::from_secs(3600)).unwrap();
        age(&path, Duration::from_secs(20));
        assert!(DirLock::acquire(dir.path()).is_err());
        age(&path, Duration::from_secs(31));
        let second = DirLock::acquire_with(dir.path(), Duration::from_secs(3600)).unwrap();
        // the first holder's release leaves the second one's lock alone
        drop(first);
        assert!(path.exists());
        assert!(DirLock::acquire(dir.path()).is_err());
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn only_the_owner_removes_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".acme.lock");
        let lock = DirLock::acquire(dir.path()).unwrap();
        std::fs::write(&path, "nonce someone-else\npid 1 on elsewhere\n").unwrap();
        drop(lock);
        assert!(path.exists());
    }

    #[test]
    fn a_held_lock_is_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".acme.lock");
        let _lock = DirLock::acquire_with(dir.path(), Duration::from_millis(20)).unwrap();
        age(&path, Duration::from_secs(600));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            let age = SystemTime::now()
                .duration_since(modified)
                .unwrap_or_default();
            if age < STALE {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never refreshed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(DirLock::acquire(dir.path()).is_err());
    }
}

//! The binary-upgrade socket (SPEC §10 "Upgrade socket"): where it lives and who may use it.
//!
//! pingora does the hand-over itself (`pingora-core` `server/transfer_fd`): the `run
//! --upgrade` process unlinks the path, binds it, **chmods it 0666**, accepts the first
//! connection and takes whatever listening sockets arrive on it; on SIGQUIT the old process
//! connects and sends its own. Neither connection is ever handed to us, so cmux-edge cannot
//! call `SO_PEERCRED` on it. What we enforce instead, around pingora:
//!
//! - the socket's directory is private: owned by our uid (or root) and with no group or other
//!   permission bits (the default, `$RUNTIME_DIRECTORY`, else `$XDG_RUNTIME_DIR/cmux-edge/`,
//!   else `/run/cmux-edge/`, is created 0700). Only our uid and root can then reach the 0666
//!   socket at all: that is the uid check, done by the kernel on the path, for both ends. A
//!   directory writable by group or others is refused at start ([`prepare`]); one they can
//!   only open is refused by `run --upgrade` (the receiving end, which would take listeners
//!   from anyone who connects first) and makes a running process warn;
//! - on SIGQUIT, the old process checks the socket file before sending ([`check_peer`]): it
//!   must be a socket owned by our uid, i.e. bound by a process of ours.
//!
//! Not enforced: the uid of the process on the other end of the accepted connection itself
//! (pingora owns that fd); root can always take part. No per-request cost.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the upgrade socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("upgrade socket {path}: cannot create its directory {dir}: {source}; set [server] upgrade_sock, RUNTIME_DIRECTORY or XDG_RUNTIME_DIR")]
    Create {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("upgrade socket {path}: {dir} is {what} (mode {mode:o}); the socket is 0666, so another user could hand this process its own listeners: use a directory only this user can open (mode 0700)")]
    Shared {
        path: PathBuf,
        dir: PathBuf,
        what: &'static str,
        mode: u32,
        /// Group or others may create files in it (not only open it).
        writable: bool,
    },
    #[error("upgrade socket {path}: {dir} belongs to uid {owner}, not to this process (uid {uid}) or root")]
    Owner {
        path: PathBuf,
        dir: PathBuf,
        owner: u32,
        uid: u32,
    },
    #[error("upgrade socket {path}: {what}")]
    Peer { path: PathBuf, what: String },
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) takes nothing, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// The default socket: `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`; the first of a
/// colon-separated list), else `$XDG_RUNTIME_DIR/cmux-edge/`, else `/run/cmux-edge/`.
pub fn default_path() -> PathBuf {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let dir = if let Some(d) = env("RUNTIME_DIRECTORY") {
        let d = d.to_string_lossy().into_owned();
        PathBuf::from(d.split(':').next().unwrap_or(&d))
    } else if let Some(x) = env("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("cmux-edge")
    } else {
        PathBuf::from("/run/cmux-edge")
    };
    dir.join("upgrade.sock")
}

/// Creates the socket's directory (0700) when missing, and refuses one that other users can
/// write to or open, or that belongs to someone else.
pub fn prepare(path: &Path) -> Result<(), SocketError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| SocketError::Create {
                path: path.to_owned(),
                dir: dir.clone(),
                source,
            })?;
    }
    let md = std::fs::metadata(&dir).map_err(|source| SocketError::Create {
        path: path.to_owned(),
        dir: dir.clone(),
        source,
    })?;
    let mode = md.permissions().mode() & 0o7777;
    let what = if mode & 0o022 != 0 {
        Some("writable by group or others")
    } else if mode & 0o055 != 0 {
        Some("open to group or others")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(SocketError::Shared {
            path: path.to_owned(),
            dir,
            what,
            mode,
            writable: mode & 0o022 != 0,
        });
    }
    let uid = euid();
    if md.uid() != uid && md.uid() != 0 {
        return Err(SocketError::Owner {
            path: path.to_owned(),
            dir,
            owner: md.uid(),
            uid,
        });
    }
    Ok(())
}

/// Before the old process sends its listeners (SIGQUIT): the socket, when it is there, must
/// be a socket bound by our uid. Missing is fine (pingora waits for it, and only our uid can
/// create it in the private directory).
pub fn check_peer(path: &Path) -> Result<(), SocketError> {
    prepare(path)?;
    let peer = |what: String| SocketError::Peer {
        path: path.to_owned(),
        what,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(peer(format!("cannot inspect it: {e}"))),
        Ok(md) => {
            use std::os::unix::fs::FileTypeExt;
            let uid = euid();
            if !md.file_type().is_socket() {
                Err(peer("is not a socket".into()))
            } else if md.uid() != uid {
                Err(peer(format!(
                    "was bound by uid {}, not by this process's uid {uid}",
                    md.uid()
                )))
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_mode(mode: u32) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn a_private_directory_is_accepted_and_a_missing_one_created_0700() {
        let d = dir_with_mode(0o700);
        assert!(prepare(&d.path().join("upgrade.sock")).is_ok());
        let sub = d.path().join("run").join("cmux-edge");
        prepare(&sub.join("upgrade.sock")).unwrap();
        let mode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_directory_others_can_write_or_open_is_refused() {
        for mode in [0o777, 0o1777, 0o770, 0o702, 0o755, 0o750] {
            let d = dir_with_mode(mode);
            let err = prepare(&d.path().join("upgrade.sock")).unwrap_err();
            assert!(matches!(err, SocketError::Shared { .. }), "{mode:o}: {err}");
        }
        let d = dir_with_mode(0o1777);
        let err = prepare(&d.path().join("upgrade.sock")).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
    }

    #[test]
    fn the_sender_accepts_only_a_socket_of_its_own_uid() {
        let d = dir_with_mode(0o700);
        let path = d.path().join("upgrade.sock");
        assert!(check_peer(&path).is_ok(), "missing: pingora waits for it");
        std::fs::write(&path, b"").unwrap();
        assert!(check_peer(&path)
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        std::fs::remove_file(&path).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(check_peer(&path).is_ok());
    }

    #[test]
    fn the_default_prefers_runtime_directory_then_xdg() {
        // Only reads the environment: no variable is set here, to stay safe with parallel tests.
        let p = default_path();
        assert_eq!(p.file_name().unwrap(), "upgrade.sock");
        if std::env::var_os("RUNTIME_DIRECTORY").is_none()
            && std::env::var_os("XDG_RUNTIME_DIR").is_none()
        {
            assert_eq!(p, Path::new("/run/cmux-edge/upgrade.sock"));
        }
    }
}

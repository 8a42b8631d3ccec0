//! The `exec` provider: `command present|cleanup <fqdn> <value>`, lego's convention, so
//! existing lego/acme.sh hook scripts work unchanged.
//!
//! The hook runs with a cleared environment ([`crate::hook::env`]): `PATH` and every
//! `CMUX_EDGE_DNS_*` variable, which is how credentials reach it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

use super::{DnsError, DnsProvider};

pub struct Exec {
    command: PathBuf,
    timeout: Duration,
}

impl Exec {
    pub fn new(command: PathBuf, timeout: Duration) -> Exec {
        Exec { command, timeout }
    }

    async fn run(&self, action: &str, fqdn: &str, value: &str) -> Result<(), DnsError> {
        let err = |reason: String| DnsError::Exec {
            command: self.command.display().to_string(),
            reason,
        };
        let mut cmd = tokio::process::Command::new(&self.command);
        cmd.env_clear()
            .envs(crate::hook::env(ENV_PREFIX, std::env::vars_os()))
            .args([action, fqdn, value])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = crate::hook::spawn(&mut cmd)
            .await
            .map_err(|e| err(format!("cannot start: {e}")))?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| err(format!("{action} did not finish within {:?}", self.timeout)))?
            .map_err(|e| err(e.to_string()))?;
        if out.status.success() {
            return Ok(());
        }
        // The hook's last words, bounded: enough to act on, never a flood in the log.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let said: String = last.unwrap_or("").chars().take(300).collect();
        Err(err(format!("{action} exited with {}: {said}", out.status)))
    }
}

/// Prefix of the variables passed on to the hook (README "exec").
pub const ENV_PREFIX: &str = "CMUX_EDGE_DNS_";

#[async_trait]
impl DnsProvider for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    async fn present(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        self.run("present", fqdn, value).await
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        self.run("cleanup", fqdn, value).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("hook");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn the_hook_gets_action_fqdn_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let hook = script(dir.path(), &format!("echo \"$@\" >> {}", log.display()));
        let exec = Exec::new(hook, Duration::from_secs(5));
        exec.present("_acme-challenge.a.test.", "v1").await.unwrap();
        exec.cleanup("_acme-challenge.a.test.", "v1").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(log).unwrap(),
            "present _acme-challenge.a.test. v1\ncleanup _acme-challenge.a.test. v1\n"
        );
    }

    #[tokio::test]
    async fn the_hook_runs_without_our_environment() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("env");
        let hook = script(dir.path(), &format!("env > {}", log.display()));
        Exec::new(hook, Duration::from_secs(5))
            .present("x.", "v")
            .await
            .unwrap();
        let env = std::fs::read_to_string(log).unwrap();
        // cargo runs tests with CARGO_* set; none of it reaches the hook
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        assert!(!env.contains("CARGO"), "{env}");
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    }

    #[tokio::test]
    async fn a_failing_or_hanging_hook_is_an_error_that_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "echo 'zone is locked' >&2; exit 3");
        let e = Exec::new(hook, Duration::from_secs(5))
            .present("x.", "v")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("zone is locked") && e.contains("3"), "{e}");
        let hook = script(dir.path(), "sleep 10");
        let e = Exec::new(hook, Duration::from_millis(200))
            .present("x.", "v")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
    }
}

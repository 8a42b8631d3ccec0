//! Operator hooks run as child processes (the `exec` DNS provider, the `[wake] command`).
//!
//! A hook runs with a cleared environment ([`env`]): `PATH` and the variables of its own
//! prefix, which is how its credentials reach it. The admin token, the registry token and
//! other hooks' secrets in the edge's environment never do.

use std::time::Duration;

/// Spawns `cmd`, retrying briefly on ETXTBSY: a hook that was just (re)written while another
/// process forked is still held open for writing by that child for a moment. Go's os/exec
/// retries the same way.
pub async fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a hook sees of `vars`: `PATH` (ours, else a standard one) and every `prefix*`
/// variable with a name after the prefix.
pub fn env(
    prefix: &str,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut out: Vec<_> = vars
        .filter(|(k, _)| {
            k == "PATH"
                || k.to_str()
                    .is_some_and(|k| k.starts_with(prefix) && k.len() > prefix.len())
        })
        .collect();
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_environment_is_path_and_its_own_variables_only() {
        let vars = [
            ("PATH", "/bin"),
            ("CMUX_EDGE_ADMIN_TOKEN", "admin"),
            ("CF_DNS_API_TOKEN", "cf"),
            ("CMUX_EDGE_DNS_API_KEY", "k"),
            ("CMUX_EDGE_WAKE_TOKEN", "w"),
            ("CMUX_EDGE_DNS_", "empty name"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let names = |prefix| {
            env(prefix, vars.clone().into_iter())
                .into_iter()
                .map(|(k, _)| k.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("CMUX_EDGE_DNS_"), ["PATH", "CMUX_EDGE_DNS_API_KEY"]);
        assert_eq!(names("CMUX_EDGE_WAKE_"), ["PATH", "CMUX_EDGE_WAKE_TOKEN"]);
        let got = env("CMUX_EDGE_DNS_", std::iter::empty());
        assert_eq!(got, [("PATH".into(), DEFAULT_PATH.into())]);
    }
}

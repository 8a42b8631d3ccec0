//! Operator hooks run as child processes (the `exec` DNS provider, the `[wake] command`).

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

//! `[wake]`: how a paused or stopped VM is woken (SPEC §13).

use super::*;
use crate::lifecycle::{WakeHook, WakeSettings};

/// `None` without a `[wake]` section: non-running VMs are proxied as they are.
/// `proxmox = true` needs the `proxmox` source, and makes it find stopped containers.
pub(super) fn wake(top: &Table, registry: &mut RegistrySettings) -> Option<WakeSettings> {
    let t = top.table(
        "wake",
        &[
            "url",
            "token",
            "command",
            "proxmox",
            "timeout",
            "max_waiting",
            "on_connect_error",
        ],
    )?;
    let mut hooks = Vec::new();
    if let Some(v) = t.get("url") {
        let url = v.parse_str(|s| {
            if s.starts_with("http://") || s.starts_with("https://") {
                Ok(s.to_owned())
            } else {
                Err(format!("{s:?} is not an http(s) URL"))
            }
        });
        let token = t
            .get("token")
            .and_then(|v| v.parse_str(resolve_secret).map(Some))
            .unwrap_or(None);
        hooks.push(url.map(|url| WakeHook::Url { url, token }));
    } else if let Some(v) = t.get("token") {
        v.error("token is sent only with url");
    }
    if let Some(v) = t.get("command") {
        let argv: Option<Vec<String>> = v
            .array()
            .and_then(|a| a.iter().map(|s| s.str().map(str::to_owned)).collect());
        hooks.push(match argv {
            Some(a) if a.first().is_some_and(|p| !p.is_empty()) => Some(WakeHook::Command(a)),
            Some(_) => {
                v.error("command needs a program: [\"/path/to/hook\", \"{id}\"]");
                None
            }
            None => None,
        });
    }
    if let Some(v) = t.get("proxmox") {
        if v.bool() == Some(true) {
            match registry.proxmox.as_mut() {
                Some(p) => {
                    p.find_stopped = true;
                    hooks.push(Some(WakeHook::Proxmox));
                }
                None => v.error("proxmox = true needs the \"proxmox\" registry source"),
            }
        }
    }
    let hook = match hooks.len() {
        0 => {
            top.ctx().report(
                &t.span(),
                "wake",
                "set one of url, command or proxmox = true",
            );
            None
        }
        1 => hooks.pop().flatten(),
        _ => {
            top.ctx().report(
                &t.span(),
                "wake",
                "url, command and proxmox exclude each other",
            );
            None
        }
    };
    let timeout = t.duration("timeout").unwrap_or(Duration::from_secs(60));
    if timeout.is_zero() {
        if let Some(v) = t.get("timeout") {
            v.error("timeout must be above zero");
        }
    }
    let max_waiting = match t.get("max_waiting") {
        None => 1000,
        Some(v) => match v.int() {
            Some(n) if (1..=1_000_000).contains(&n) => n as usize,
            Some(_) => {
                v.error("max_waiting must be between 1 and 1000000");
                1000
            }
            None => 1000,
        },
    };
    Some(WakeSettings {
        hook: hook?,
        timeout,
        max_waiting,
        on_connect_error: t.bool("on_connect_error").unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(
            Path::new("t.toml"),
            &format!("[[domains]]\nname = \"example.com\"\n{extra}"),
        )
    }

    #[test]
    fn a_wake_section_takes_one_hook_and_reports_positions() {
        let c = parse("[wake]\nurl = \"http://cp/vms/{id}/resume\"\ntimeout = \"5s\"\n").unwrap();
        let w = c.wake.unwrap();
        assert_eq!(w.timeout, std::time::Duration::from_secs(5));
        assert_eq!((w.max_waiting, w.on_connect_error), (1000, false));
        assert!(parse("").unwrap().wake.is_none());
        let err = parse("[wake]\nurl = \"http://x/\"\ncommand = [\"/bin/true\"]\n").unwrap_err();
        assert!(err.to_string().contains("exclude each other"), "{err}");
        let err = parse("[wake]\nurl = \"ftp://x\"\n").unwrap_err();
        assert!(err.to_string().starts_with("t.toml:4:7: wake.url"), "{err}");
        let err = parse("[wake]\nproxmox = true\n").unwrap_err();
        assert!(err.to_string().contains("wake.proxmox"), "{err}");
        let err =
            parse("[wake]\ncommand = [\"/bin/true\"]\nmax_waiting = 0\nbogus = 1\n").unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }
}

//! `[activity]`: which requests are not activity, how many VMs are tracked, and the webhook
//! (SPEC §13).

use super::*;
use crate::lifecycle::{ActivitySettings, WebhookSettings};

pub(super) fn activity(top: &Table) -> ActivitySettings {
    let mut s = ActivitySettings::default();
    let Some(t) = top.table("activity", &["ignore_user_agents", "max_vms", "webhook"]) else {
        return s;
    };
    if let Some(items) = t.get("ignore_user_agents").and_then(|v| v.array()) {
        s.ignore_user_agents = items
            .iter()
            .filter_map(|v| v.str().map(str::to_owned))
            .collect();
    }
    if let Some(v) = t.get("max_vms") {
        match v.int() {
            Some(n) if (16..=10_000_000).contains(&n) => s.max_vms = n as usize,
            Some(_) => v.error("max_vms must be between 16 and 10000000"),
            None => {}
        }
    }
    if let Some(w) = t.table("webhook", &["url", "secret", "interval"]) {
        let url = w.require("url").and_then(|v| {
            v.parse_str(|s| {
                if s.starts_with("http://") || s.starts_with("https://") {
                    Ok(s.to_owned())
                } else {
                    Err(format!("{s:?} is not an http(s) URL"))
                }
            })
        });
        let secret = w
            .require("secret")
            .and_then(|v| v.parse_str(resolve_secret));
        let interval = match w.get("interval") {
            None => Some(Duration::from_secs(30)),
            Some(v) => v.duration().and_then(|d| {
                if d < Duration::from_millis(100) {
                    v.error("interval must be at least 100ms");
                    None
                } else {
                    Some(d)
                }
            }),
        };
        if let (Some(url), Some(secret), Some(interval)) = (url, secret, interval) {
            s.webhook = Some(WebhookSettings {
                url,
                secret,
                interval,
            });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn the_webhook_needs_a_url_and_a_secret() {
        let parse = |extra: &str| {
            Config::parse(
                Path::new("t.toml"),
                &format!("[[domains]]\nname = \"example.com\"\n{extra}"),
            )
        };
        let c = parse(
            "[activity]\nignore_user_agents = [\"kube-probe/*\"]\nwebhook = { url = \"http://cp/activity\", secret = \"s\", interval = \"5s\" }\n",
        )
        .unwrap();
        assert_eq!(c.activity.ignore_user_agents, ["kube-probe/*"]);
        let w = c.activity.webhook.unwrap();
        assert_eq!(w.interval, std::time::Duration::from_secs(5));
        let err = parse("[activity]\nwebhook = { url = \"http://cp/\" }\n").unwrap_err();
        assert!(err.to_string().contains("activity.webhook.secret"), "{err}");
        assert!(parse("").unwrap().activity.webhook.is_none());
    }
}

//! `[upstreams]`: where registry answers may point (SPEC §10, [`crate::egress`]).

use super::*;
use crate::egress::{parse_net, EgressPolicy, EgressSettings};

pub(super) fn upstreams(top: &Table) -> EgressSettings {
    let mut s = EgressSettings::default();
    let Some(t) = top.table("upstreams", &["allow", "deny", "allow_loopback"]) else {
        return s;
    };
    let nets = |key: &str| {
        t.get(key).map(|v| {
            v.array()
                .unwrap_or_default()
                .iter()
                .filter_map(|item| item.parse_str(parse_net))
                .collect::<Vec<_>>()
        })
    };
    s.allow = nets("allow");
    s.deny = nets("deny").unwrap_or_default();
    if let (Some(v), Some(allow)) = (t.get("allow"), &s.allow) {
        if allow.is_empty() && !t.ctx().has_problems() {
            v.error("an empty allow list refuses every upstream; remove it to allow any address not denied");
        }
    }
    if let Some(b) = t.bool("allow_loopback") {
        s.allow_loopback = b;
    }
    s
}

/// `check` warnings: a `[[registry.vms]]` IP address the policy always refuses, and a
/// `proxmox` source (addresses the containers report themselves) without `allow`.
pub(super) fn warnings(top: &Table, policy: &EgressPolicy, registry: &RegistrySettings) {
    // The proxmox source can only be named in [registry], so no table means nothing to say.
    let Some(reg) = top.get("registry") else {
        return;
    };
    if let Some(vms) = reg.peek("vms") {
        for vm in vms.peek_items() {
            let Some(address) = vm.peek("address") else {
                continue;
            };
            let Some(Ok(Address::Ip(ip))) = address.peek_str().map(Address::parse) else {
                continue;
            };
            if let Err(why) = policy.check(SocketAddr::new(ip, 0), false) {
                address.warn(format!(
                    "{ip} is always refused by the upstream egress policy ({why})"
                ));
            }
        }
    }
    if registry.sources.contains(&SourceKind::Proxmox) && !policy.allow_is_set() {
        let at = reg.peek("sources").unwrap_or(reg);
        at.warn(
            "the proxmox source trusts the address each container reports: set [upstreams] allow to the containers' network",
        );
    }
}

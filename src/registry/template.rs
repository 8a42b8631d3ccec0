//! `source = "template"`: the address is an operator template filled with the validated id,
//! e.g. `cmux-{id}.lan` (Proxmox containers named after the id, resolved by DNS, the Caddy
//! convention) or `10.100.0.{id}`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{Address, Lookup, Registry, Scheme, Vm};

/// `<prefix>{id}<suffix>`, checked at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTemplate {
    prefix: String,
    suffix: String,
    /// Everything but `{id}` is digits, dots and colons: the result must be an IP literal.
    ip_shaped: bool,
}

impl AddressTemplate {
    pub fn parse(s: &str) -> Result<AddressTemplate, String> {
        let Some((prefix, suffix)) = s.split_once("{id}") else {
            return Err(format!("template {s:?} has no {{id}}"));
        };
        if suffix.contains("{id}") || s.contains(['/', '@', ' ']) {
            return Err(format!(
                "template {s:?} must contain {{id}} once and nothing but a host name around it"
            ));
        }
        // Check the shape with a sample id: the result must be a valid address.
        let sample = format!("{prefix}1{suffix}");
        Address::parse(&sample).map_err(|e| format!("template {s:?}: {e}"))?;
        let ip_shaped = format!("{prefix}{suffix}")
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b':');
        Ok(AddressTemplate {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
            ip_shaped,
        })
    }

    /// The address for a validated id, or `None` when the id cannot make one (e.g. a name
    /// id in an IP template).
    pub fn fill(&self, id: &str) -> Option<Address> {
        let s = format!("{}{}{}", self.prefix, id, self.suffix);
        if self.ip_shaped {
            return s.parse::<IpAddr>().ok().map(Address::Ip);
        }
        // `_` is valid in ids but not in host names; Proxmox maps it to `-` the same way.
        Address::parse(&s.replace('_', "-")).ok()
    }
}

#[derive(Debug)]
pub struct TemplateSource {
    template: AddressTemplate,
}

impl TemplateSource {
    pub fn new(template: AddressTemplate) -> TemplateSource {
        TemplateSource { template }
    }
}

impl Registry for TemplateSource {
    fn kind(&self) -> &'static str {
        "template"
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        let vm = self.template.fill(id).map(|address| {
            Arc::new(Vm {
                id: id.to_owned(),
                address,
                ports: BTreeMap::new(),
                scheme: Scheme::Http,
                unresolvable_is_unknown: true,
                tls_server_name: None,
                tls_verify: true,
                self_reported: false,
                access_epoch: 0,
                state: super::VmState::Running,
            })
        });
        Lookup::Ready(Ok(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_only_validated_ids() {
        let t = AddressTemplate::parse("cmux-{id}.lan").unwrap();
        assert_eq!(t.fill("b1"), Some(Address::Name("cmux-b1.lan".into())));
        assert_eq!(t.fill("a_b"), Some(Address::Name("cmux-a-b.lan".into())));
        let t = AddressTemplate::parse("10.100.0.{id}").unwrap();
        assert_eq!(
            t.fill("200"),
            Some(Address::Ip("10.100.0.200".parse().unwrap()))
        );
        assert_eq!(t.fill("abc"), None);
        assert_eq!(t.fill("300"), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(AddressTemplate::parse("cmux.lan").is_err());
        assert!(AddressTemplate::parse("{id}.{id}.lan").is_err());
        assert!(AddressTemplate::parse("http://{id}.lan").is_err());
        assert!(AddressTemplate::parse("{id}@evil").is_err());
    }
}

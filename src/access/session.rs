//! The edge's own session (SPEC §12): what the cookie set by the token exchange holds.
//!
//! The value is `1.<vm>.<port or *>.<expiry>.<epoch>.<mac>`, the MAC being HMAC-SHA256 over
//! everything before it, base64url without padding. It is never the control plane's token:
//! the edge vouches only for what it checked (this VM, this port or every port, until this
//! second, under this `access_epoch`). A VM id is `[a-z0-9_-]` (routing validated it) and the
//! other fields are digits or `*`, so the value needs no quoting in a cookie.
//!
//! Checking costs one HMAC-SHA256 over ~40 bytes, a 43-byte base64 decode into a stack
//! buffer and a few integer parses: no allocation, no lookup beyond the registry answer the
//! request needed anyway. The key is shared by every replica (see [`SessionKey::derive`]),
//! so any replica accepts a cookie another one set.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

use super::DenyReason;

const VERSION: &str = "1";
/// Base64url of a 32-byte tag, unpadded.
const TAG_B64_LEN: usize = 43;

/// The HMAC key of every session this deployment issues.
pub struct SessionKey(hmac::Key);

impl SessionKey {
    /// `HMAC-SHA256(secret, "cmux-edge session v1")`: a key of its own, so a session MAC is
    /// never a valid token signature under the secret it was derived from, and every replica
    /// configured with the same secret derives the same key.
    pub fn derive(secret: &[u8]) -> SessionKey {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&root, b"cmux-edge session v1");
        SessionKey(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }
}

/// What a session grants on the host it was set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// This port only (the token listed ports; the cookie lives on one port's host).
    Port(u16),
    /// The token said `"*"`.
    Every,
}

/// The cookie value for `vm`, valid until `expires` (Unix seconds) under `epoch`.
pub fn mint(key: &SessionKey, vm: &str, granted: Granted, expires: u64, epoch: u64) -> String {
    let mut value = match granted {
        Granted::Port(p) => format!("{VERSION}.{vm}.{p}.{expires}.{epoch}"),
        Granted::Every => format!("{VERSION}.{vm}.*.{expires}.{epoch}"),
    };
    let tag = hmac::sign(&key.0, value.as_bytes());
    value.push('.');
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut value);
    value
}

/// Checks a cookie value for `vm`/`port` at `now` against the VM's current `epoch`.
pub fn check(
    key: &SessionKey,
    value: &str,
    vm: &str,
    port: u16,
    epoch: u64,
    now: u64,
) -> Result<(), DenyReason> {
    let bad = DenyReason::BadSignature;
    let (payload, tag_b64) = value.rsplit_once('.').ok_or(bad)?;
    if tag_b64.len() != TAG_B64_LEN {
        return Err(bad);
    }
    let mut tag = [0u8; 33];
    let n = URL_SAFE_NO_PAD
        .decode_slice(tag_b64, &mut tag)
        .map_err(|_| bad)?;
    hmac::verify(&key.0, payload.as_bytes(), &tag[..n]).map_err(|_| bad)?;
    let mut fields = payload.split('.');
    let mut next = || fields.next().ok_or(bad);
    if next()? != VERSION {
        return Err(bad);
    }
    if next()? != vm {
        return Err(DenyReason::WrongVm);
    }
    let ports = next()?;
    if ports != "*" && ports.parse::<u16>().map_err(|_| bad)? != port {
        return Err(DenyReason::WrongPort);
    }
    let expires: u64 = next()?.parse().map_err(|_| bad)?;
    let issued_epoch: u64 = next()?.parse().map_err(|_| bad)?;
    if issued_epoch < epoch {
        return Err(DenyReason::Revoked);
    }
    if expires < now {
        return Err(DenyReason::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SessionKey {
        SessionKey::derive(b"test secret")
    }

    #[test]
    fn a_session_is_valid_for_its_vm_port_and_epoch_until_it_expires() {
        let v = mint(&key(), "b1", Granted::Port(3000), 1000, 2);
        assert_eq!(check(&key(), &v, "b1", 3000, 2, 999), Ok(()));
        assert_eq!(check(&key(), &v, "b1", 3000, 2, 1000), Ok(()));
        assert_eq!(
            check(&key(), &v, "b1", 3000, 2, 1001),
            Err(DenyReason::Expired)
        );
        assert_eq!(
            check(&key(), &v, "b2", 3000, 2, 999),
            Err(DenyReason::WrongVm)
        );
        assert_eq!(
            check(&key(), &v, "b1", 3001, 2, 999),
            Err(DenyReason::WrongPort)
        );
        assert_eq!(
            check(&key(), &v, "b1", 3000, 3, 999),
            Err(DenyReason::Revoked)
        );
    }

    #[test]
    fn every_port_sessions_say_star() {
        let v = mint(&key(), "b1", Granted::Every, 1000, 0);
        assert!(v.starts_with("1.b1.*.1000.0."), "{v}");
        assert_eq!(check(&key(), &v, "b1", 1, 0, 0), Ok(()));
    }

    #[test]
    fn any_change_to_the_value_breaks_the_mac() {
        let v = mint(&key(), "b1", Granted::Port(3000), 1000, 0);
        let forged = v.replacen(".1000.", ".9999.", 1);
        assert_eq!(
            check(&key(), &forged, "b1", 3000, 0, 0),
            Err(DenyReason::BadSignature)
        );
        let other = SessionKey::derive(b"another secret");
        assert_eq!(
            check(&other, &v, "b1", 3000, 0, 0),
            Err(DenyReason::BadSignature)
        );
        for junk in [
            "",
            ".",
            "1.b1.3000.1000.0",
            &v[..v.len() - 1],
            "a.b.c.d.e.f",
        ] {
            assert_eq!(
                check(&key(), junk, "b1", 3000, 0, 0),
                Err(DenyReason::BadSignature),
                "{junk}"
            );
        }
    }
}

//! The control plane's token (SPEC §12): a compact JWS whose `kid` names one configured key,
//! verified with `jsonwebtoken` against that key's one algorithm only.
//!
//! `alg: none` does not parse (the crate has no such algorithm), and an algorithm other than
//! the key's (an EdDSA header on an HS256 key id, or the reverse) is refused before any
//! signature is computed, so a public key can never be used as an HMAC secret. Costs one
//! HMAC-SHA256 or Ed25519 verification, a base64 decode and a small JSON parse: it runs on
//! the exchange and on `X-Cmux-Token` requests, never on a request carrying the session
//! cookie.

use std::collections::HashSet;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{DenyReason, KeySettings, KeySource};

/// Clock skew accepted on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 60;

/// The ports a token grants: a list, or every port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ports {
    All(AllPorts),
    List(Vec<u16>),
}

/// The string `"*"`, and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllPorts;

impl Serialize for AllPorts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("*")
    }
}

impl<'de> Deserialize<'de> for AllPorts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "*" {
            Ok(AllPorts)
        } else {
            Err(serde::de::Error::custom(
                "ports must be a list of numbers or \"*\"",
            ))
        }
    }
}

impl Ports {
    pub fn allows(&self, port: u16) -> bool {
        match self {
            Ports::All(_) => true,
            Ports::List(l) => l.contains(&port),
        }
    }
}

/// The claims of a token. `exp` is required; unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub vm: String,
    pub ports: Ports,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The VM's `access_epoch` the token was issued under (0 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// One configured key, decoded once per config generation.
pub(super) struct Key {
    id: String,
    decoding: DecodingKey,
    validation: Validation,
    /// The HS256 secret, for `cmux-edge token` (none for a public key).
    secret: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {0:?}: {1}")]
    Invalid(String, String),
    #[error("no key {0:?} in [access] keys")]
    Unknown(String),
    #[error("key {0:?} is a public key: only an HS256 secret can sign")]
    PublicOnly(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

impl Key {
    pub(super) fn new(k: &KeySettings) -> Result<Key, KeyError> {
        let invalid =
            |e: jsonwebtoken::errors::Error| KeyError::Invalid(k.id.clone(), e.to_string());
        let (alg, decoding, secret) = match &k.source {
            KeySource::Secret(s) => (
                Algorithm::HS256,
                DecodingKey::from_secret(&s.0).map_err(invalid)?,
                Some(s.0.clone()),
            ),
            KeySource::Ed25519Pem(pem) => (
                Algorithm::EdDSA,
                DecodingKey::from_ed_pem(pem).map_err(invalid)?,
                None,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
        Ok(Key {
            id: k.id.clone(),
            decoding,
            validation,
            secret,
        })
    }

    pub(super) fn secret(&self) -> Option<&[u8]> {
        self.secret.as_deref()
    }
}

/// Verifies `token` against the key its `kid` names. Every way a token can be malformed,
/// unsigned, signed by an unknown key or with the wrong algorithm is `bad signature`.
pub(super) fn verify(keys: &[Key], token: &str) -> Result<Claims, DenyReason> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| DenyReason::BadSignature)?;
    let kid = header.kid.as_deref().ok_or(DenyReason::BadSignature)?;
    let key = keys
        .iter()
        .find(|k| k.id == kid)
        .ok_or(DenyReason::BadSignature)?;
    match jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            // nbf in the future is outside the token's validity window like a past exp: the
            // SPEC's reasons are a fixed set, and "expired" tells the caller to mint anew.
            ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => DenyReason::Expired,
            _ => DenyReason::BadSignature,
        }),
    }
}

/// Signs `claims` with HS256 under key `kid` (`cmux-edge token`, tests, benchmarks).
pub(super) fn sign(keys: &[Key], kid: Option<&str>, claims: &Claims) -> Result<String, KeyError> {
    let key = match kid {
        Some(id) => keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::Unknown(id.to_owned()))?,
        None => keys
            .iter()
            .find(|k| k.secret.is_some())
            .ok_or_else(|| KeyError::Unknown("(any HS256 key)".to_owned()))?,
    };
    let secret = key
        .secret
        .as_deref()
        .ok_or_else(|| KeyError::PublicOnly(key.id.clone()))?;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.id.clone());
    let encoding = EncodingKey::from_secret(secret).map_err(|e| KeyError::Sign(e.to_string()))?;
    jsonwebtoken::encode(&header, claims, &encoding).map_err(|e| KeyError::Sign(e.to_string()))
}

//! cmux-edge: a wildcard edge reverse proxy for sandbox preview URLs, on pingora.
//!
//! `https://port-<port>-vm-<id>.<domain>/` → [`route`] parses the host, [`registry`] says
//! where VM `<id>` lives, [`policy`] says how port `<port>` behaves, and [`proxy`] carries
//! the request there with the `X-Cmux-*` headers of [`forward`].

pub mod config;
pub mod policy;
pub mod registry;
pub mod route;
pub mod trust;

//! cmux-edge: a wildcard edge reverse proxy for sandbox preview URLs, on pingora.
//!
//! `https://port-<port>-vm-<id>.<domain>/` → [`route`] parses the host, [`registry`] says
//! where VM `<id>` lives, [`policy`] says how port `<port>` behaves, and [`proxy`] carries
//! the request there with the headers of [`forward`]. [`edge`] ties one config generation
//! together; [`server`] assembles the listeners.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod config;
pub mod dns;
pub mod edge;
pub mod egress;
pub mod files;
pub mod flight;
pub mod forward;
pub mod hook;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod respond;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod slow;
pub mod tls;
pub mod trust;
pub mod upgrade_socket;

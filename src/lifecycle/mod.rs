//! The sandbox lifecycle at the edge (SPEC §13): waking paused VMs on request ([`wake`]),
//! and the per-VM activity a control plane needs to pause idle ones ([`activity`], pulled
//! through the admin API or pushed by [`webhook`]).
//!
//! Both live on `Edge` ([`Wakes`], [`Activity`]), so a reload neither repeats a wake in
//! flight nor forgets activity; their settings belong to each config generation.

pub mod activity;
pub mod wake;
pub mod webhook;

pub use activity::{Activity, ActivitySettings, Handle};
pub use wake::{Rewake, WakeError, WakeHook, WakeSettings, Wakes};
pub use webhook::{Pusher, WebhookSettings};

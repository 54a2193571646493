//! archy-agent: the minimal on-node agent of a rootless Podman/Quadlet app platform.
//!
//! Data flows one way: [`manifest`] -> [`secrets`] -> [`quadlet`] unit -> [`runtime`] ->
//! observed state -> [`metrics`]. See ARCHITECTURE.md at the repository root for the map
//! and the invariants.

pub mod agent;
pub mod api;
pub mod atomic;
pub mod config;
pub mod doctor;
pub mod exec;
pub mod failpoint;
pub mod manifest;
pub mod metrics;
pub mod quadlet;
pub mod reconcile;
pub mod runtime;
pub mod secrets;
pub mod store;

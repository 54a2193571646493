//! archy-agent: the minimal on-node agent of a rootless Podman/Quadlet app platform.
//!
//! Data flows one way: [`manifest`] -> [`secrets`] -> [`quadlet`] unit -> runtime. See
//! ARCHITECTURE.md at the repository root for the map and the invariants.

pub mod manifest;
pub mod quadlet;
pub mod secrets;

//! Scenarios: the file format ([`model`]), the engine that runs one on any [`Node`]
//! ([`engine`]), one function per step ([`steps`]) and per invariant ([`invariants`]).
//!
//! [`Node`]: crate::node::Node

pub mod checker;
pub mod engine;
pub mod history;
pub mod invariants;
pub mod measure;
pub mod model;
pub mod probe;
pub mod steps;

pub use engine::{Iteration, Verdict};
pub use model::*;

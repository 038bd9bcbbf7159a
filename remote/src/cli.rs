//! Operator tools of the `sessio` binary that look at a host's arena
//! directly: `sessio inspect` (sessions and their attributes) and
//! `sessio stats` (arena-wide counters), both with `--json` for scripts.
//! The binary parses the arguments and prints what these functions return.

pub mod arena;

pub use arena::{InspectArgs, StatsArgs, inspect, stats};

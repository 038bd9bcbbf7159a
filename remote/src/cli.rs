//! Operator-facing pieces of the `sessio` binary:
//!
//! - [`arena`]: tools that look at a host's arena directly: `sessio inspect`
//!   (sessions and their attributes) and `sessio stats` (arena-wide
//!   counters), both with `--json` for scripts;
//! - [`config`]: TOML config files for `sessio node` and `sessio agent`;
//! - [`metrics`]: Prometheus text metrics (`--metrics-addr`) for both.
//!
//! The binary parses the arguments and calls these.

pub mod arena;
pub mod config;
pub mod metrics;

pub use arena::{InspectArgs, StatsArgs, inspect, stats};

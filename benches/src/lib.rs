//! Benchmark support for sessio.

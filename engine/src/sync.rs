//! The one door to atomics. Under `cfg(loom)` the protocol models in
//! `tests/loom_*.rs` swap in loom's checked atomics; everywhere else these are
//! the standard library's.
//!
//! Everything that lives in the arena is one of these fixed-width atomics or a
//! plain integer written before it is published, so the same types work for
//! memory shared between processes: the atomics of `std` are lock-free on
//! x86-64 and aarch64 and act on the bytes themselves, with no process-local
//! state.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
// Only the arena's chunk map uses it, and the loom build leaves the arena out.
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::AtomicU8;

/// Spin politely: a few pause instructions, then yield the CPU.
#[cfg(not(loom))]
pub(crate) use crossbeam_utils::Backoff;

#[cfg(loom)]
pub(crate) struct Backoff;

#[cfg(loom)]
impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff
    }
    pub(crate) fn snooze(&self) {
        loom::thread::yield_now();
    }
    pub(crate) fn spin(&self) {
        loom::thread::yield_now();
    }
}

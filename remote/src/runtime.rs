//! Running a future to completion on either I/O engine.

use std::future::Future;

use sessio_net::{Backend, Epoll, IoUring};

/// A [`Backend`] that can also build its single-threaded runtime.
pub trait Rt: Backend {
    /// A runtime kept across calls (sockets stay registered with the
    /// runtime that opened them).
    type Runtime;
    /// Builds a runtime for this thread.
    fn runtime() -> std::io::Result<Self::Runtime>;
    /// Runs `f` to completion on `rt`.
    fn run<F: Future>(rt: &Self::Runtime, f: F) -> F::Output;
    /// Runs `f` to completion on a fresh runtime on this thread.
    fn block_on<F: Future>(f: F) -> F::Output;
    /// Whether this engine works here (`io_uring` may be missing or
    /// forbidden by seccomp).
    fn available() -> bool;
}

impl Rt for IoUring {
    type Runtime = compio::runtime::Runtime;
    fn runtime() -> std::io::Result<Self::Runtime> {
        IoUring::runtime()
    }
    fn run<F: Future>(rt: &Self::Runtime, f: F) -> F::Output {
        rt.block_on(f)
    }
    fn block_on<F: Future>(f: F) -> F::Output {
        IoUring::runtime()
            .expect("io_uring runtime (check IoUring::available first)")
            .block_on(f)
    }
    fn available() -> bool {
        IoUring::runtime().is_ok()
    }
}

impl Rt for Epoll {
    type Runtime = tokio::runtime::Runtime;
    fn runtime() -> std::io::Result<Self::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    fn run<F: Future>(rt: &Self::Runtime, f: F) -> F::Output {
        rt.block_on(f)
    }
    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio current-thread runtime")
            .block_on(f)
    }
    fn available() -> bool {
        true
    }
}

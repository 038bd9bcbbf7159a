//! Running a future to completion on either I/O engine, and the signal
//! flag that ends the `sessio` processes gracefully.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT set a flag (see [`stop_requested`]) instead of
/// killing the process, so it can shut down cleanly.
pub fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` is an `extern "C"` function that only performs
        // an atomic store, which is async-signal-safe; `sigaction` is given
        // a fully initialized struct.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&raw mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

/// Whether SIGTERM or SIGINT arrived since [`install_stop_signals`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Completes once [`stop_requested`] holds (polled every 20 ms).
pub async fn stopped<B: Backend>() {
    while !stop_requested() {
        B::sleep(Duration::from_millis(20)).await;
    }
}

//! SIGTERM and SIGINT as a shutdown signal, so `sessio` processes stop
//! cleanly (flush, drain, close) instead of dying mid-write: a thread waits
//! for the signals and fires one [`Shutdown`] that every waiter, on any
//! thread and either I/O engine, wakes on.

use std::future::Future;
use std::sync::OnceLock;

use sessio_net::Shutdown;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn shutdown() -> &'static Shutdown {
    static STOP: OnceLock<Shutdown> = OnceLock::new();
    STOP.get_or_init(Shutdown::new)
}

/// Makes SIGTERM and SIGINT fire the stop signal (see [`stop_requested`])
/// instead of killing the process.
pub fn install_stop_signals() {
    // Registering can only fail for signals that cannot be caught; these
    // two can.
    let mut signals = Signals::new([SIGTERM, SIGINT]).expect("register the stop signals");
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                shutdown().fire();
            }
        })
        .expect("spawn the signal thread");
}

/// Whether SIGTERM or SIGINT arrived since [`install_stop_signals`].
pub fn stop_requested() -> bool {
    shutdown().is_fired()
}

/// Completes once SIGTERM or SIGINT arrives.
pub fn stopped() -> impl Future<Output = ()> + 'static {
    shutdown().wait()
}

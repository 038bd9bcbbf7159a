//! SIGTERM and SIGINT as a flag, so `sessio` processes stop cleanly (flush,
//! drain, close) instead of dying mid-write.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sessio_net::Backend;

fn flag() -> &'static Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Makes SIGTERM and SIGINT set the stop flag (see [`stop_requested`])
/// instead of killing the process.
pub fn install_stop_signals() {
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // Registering can only fail for signals that cannot be caught;
        // these two can.
        signal_hook::flag::register(sig, Arc::clone(flag())).expect("register a stop signal");
    }
}

/// Whether SIGTERM or SIGINT arrived since [`install_stop_signals`].
pub fn stop_requested() -> bool {
    flag().load(Ordering::SeqCst)
}

/// Completes once [`stop_requested`] holds (polled every 20 ms).
pub async fn stopped<B: Backend>() {
    while !stop_requested() {
        B::sleep(Duration::from_millis(20)).await;
    }
}

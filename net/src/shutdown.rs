//! A shutdown signal shared by threads and by both I/O engines: fired once,
//! it wakes every waiter at once, with no polling.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Fire once; every [`Shutdown::wait`] on any thread completes. Clones
/// share the signal. `tokio::sync::watch` wakes through plain wakers, so a
/// waiter may run on a compio runtime as well as a tokio one.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A signal not fired yet.
    pub fn new() -> Shutdown {
        Shutdown {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Fires the signal (again is a no-op).
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the signal fires (at once if it has).
    pub fn wait(&self) -> impl Future<Output = ()> + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives in `self.tx`, held by this future's caller or
            // its clones; if every clone is gone the signal can no longer
            // fire, and waiting ends too.
            let _ = rx.wait_for(|fired| *fired).await;
        }
    }
}

/// Fires a [`Shutdown`] when dropped, however the scope is left (a panic
/// too): a thread that stops takes its siblings with it.
#[derive(Debug)]
pub struct FireOnDrop(pub Shutdown);

impl Drop for FireOnDrop {
    fn drop(&mut self) {
        self.0.fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Epoll, IoUring};
    use std::time::{Duration, Instant};

    fn wakes_from_another_thread<B: Backend>() {
        let s = Shutdown::new();
        let waiter = std::thread::spawn({
            let s = s.clone();
            move || {
                B::block_on(s.wait());
                // It ended only because the signal fired.
                s.is_fired()
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the wait ended before the signal");
        let fired_at = Instant::now();
        s.fire();
        assert!(waiter.join().unwrap());
        assert!(fired_at.elapsed() < Duration::from_secs(5));
        // Fired already: completes at once.
        B::block_on(s.wait());
    }

    #[test]
    fn wakes_a_waiter_on_either_engine() {
        wakes_from_another_thread::<Epoll>();
        assert!(
            IoUring::available(),
            "io_uring is required on this platform"
        );
        wakes_from_another_thread::<IoUring>();
    }

    #[test]
    fn fire_on_drop_fires_on_panic() {
        let s = Shutdown::new();
        let r = std::panic::catch_unwind({
            let s = s.clone();
            move || {
                let _guard = FireOnDrop(s);
                panic!("a serving thread fails");
            }
        });
        assert!(r.is_err());
        assert!(s.is_fired());
    }
}

//! The dispatcher's doorbell. A dispatcher with nothing to do sleeps until a
//! process marks a session dirty, instead of ticking: an idle host's
//! replicator then costs nothing. The arena's hint is a futex in shared
//! memory, which the dispatcher's runtime cannot wait on, so a thread of
//! its own waits on it and wakes the dispatcher's task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use sessio_engine::{Arena, DirtyBell};

use crate::runtime::Rt;

/// Longest doze: the dispatcher still comes round this often to sweep a
/// slice of the dirty bitmap and refresh its stats.
pub(super) const DOZE_MAX: Duration = Duration::from_millis(100);

/// Shared by the dispatcher and its watcher thread.
#[derive(Debug)]
pub(super) struct Watch {
    bell: DirtyBell,
    /// The dispatcher's task while it dozes.
    waker: Mutex<Option<Waker>>,
    armed: Condvar,
    stop: Arc<AtomicBool>,
}

impl Watch {
    /// The watch and its thread, which ends once `stop` is set and
    /// [`Watch::ring`] called.
    pub(super) fn start(
        arena: &Arena,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(Arc<Watch>, JoinHandle<()>)> {
        let watch = Arc::new(Watch {
            bell: arena.dirty_bell(),
            waker: Mutex::new(None),
            armed: Condvar::new(),
            stop,
        });
        let thread = std::thread::Builder::new()
            .name("sessio-doorbell".into())
            .spawn({
                let watch = Arc::clone(&watch);
                move || watch.run()
            })?;
        Ok((watch, thread))
    }

    fn run(&self) {
        loop {
            {
                let Ok(mut waker) = self.waker.lock() else {
                    return;
                };
                while waker.is_none() && !self.stop.load(Ordering::SeqCst) {
                    waker = match self.armed.wait_timeout(waker, DOZE_MAX) {
                        Ok((w, _)) => w,
                        Err(_) => return,
                    };
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                self.wake();
                return;
            }
            self.bell.wait(DOZE_MAX);
            if !self.bell.asleep() {
                self.wake();
            }
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }

    /// Wakes a dozing dispatcher (and the watcher) to see the stop.
    pub(super) fn ring(&self) {
        self.bell.ring();
        self.armed.notify_all();
    }

    /// Sleeps until a session is marked dirty, the replicator stops, or
    /// [`DOZE_MAX`] has passed. Returns at once when something is marked.
    pub(super) async fn doze<B: Rt>(&self, arena: &Arena) {
        if !arena.dirty_sleep() {
            return;
        }
        let _ = B::timeout(
            DOZE_MAX,
            std::future::poll_fn(|cx| {
                if !self.bell.asleep() || self.stop.load(Ordering::SeqCst) {
                    return Poll::Ready(());
                }
                if let Ok(mut w) = self.waker.lock() {
                    *w = Some(cx.waker().clone());
                }
                self.armed.notify_one();
                Poll::Pending
            }),
        )
        .await;
        if let Ok(mut w) = self.waker.lock() {
            w.take();
        }
    }
}

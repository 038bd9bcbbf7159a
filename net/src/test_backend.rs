//! Which I/O engine the workspace's test suites run on, decided in one
//! place: [`IoUring`](crate::IoUring) where it works here, else
//! [`Epoll`](crate::Epoll), so a machine without `io_uring` (an old
//! kernel, a seccomp profile) runs every test over epoll instead of
//! failing or skipping it.
//!
//! `SESSIO_TEST_BACKEND=epoll` picks epoll even where `io_uring` works,
//! so the fallback can be run on a machine that has `io_uring`;
//! `SESSIO_TEST_BACKEND=io_uring` requires `io_uring` and panics without
//! it. Test processes hand the choice on to the processes they spawn
//! (`sessio node --epoll`, the replicator's `force_epoll`).
//!
//! Test support: not part of the API an application uses.

use std::io::Write;
use std::sync::OnceLock;

use crate::{Backend, IoUring};

/// The environment variable that forces an engine on test runs.
pub const VAR: &str = "SESSIO_TEST_BACKEND";

/// An engine tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// `io_uring` (compio).
    IoUring,
    /// epoll (tokio).
    Epoll,
}

impl TestBackend {
    /// The engine of this test process: decided on the first call and said
    /// once on stderr, with the reason.
    ///
    /// # Panics
    ///
    /// When [`VAR`] holds anything but `epoll` or `io_uring`, or asks for
    /// `io_uring` where it does not work.
    pub fn get() -> TestBackend {
        static CHOSEN: OnceLock<TestBackend> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let (chosen, why) = choose(std::env::var(VAR).ok().as_deref());
            // Straight to the descriptor: the test harness captures
            // `eprintln!` of a passing test, and this must be seen.
            let _ = writeln!(std::io::stderr(), "tests run on {}: {why}", chosen.name());
            chosen
        })
    }

    /// Whether this is [`TestBackend::Epoll`].
    pub fn is_epoll(self) -> bool {
        self == TestBackend::Epoll
    }

    /// The engine's [`Backend::NAME`].
    pub fn name(self) -> &'static str {
        match self {
            TestBackend::IoUring => <crate::IoUring as Backend>::NAME,
            TestBackend::Epoll => <crate::Epoll as Backend>::NAME,
        }
    }
}

fn choose(var: Option<&str>) -> (TestBackend, String) {
    let uring = IoUring::runtime().map(drop);
    match (var, uring) {
        (Some("epoll"), _) => (TestBackend::Epoll, format!("{VAR}=epoll asks for it")),
        (Some("io_uring"), Ok(())) => (TestBackend::IoUring, format!("{VAR}=io_uring")),
        (Some("io_uring"), Err(e)) => {
            panic!("{VAR}=io_uring, but io_uring is unavailable here ({e})")
        }
        (Some(other), _) => panic!("{VAR}={other:?}: expected \"epoll\" or \"io_uring\""),
        (None, Ok(())) => (TestBackend::IoUring, "io_uring works here".into()),
        (None, Err(e)) => (
            TestBackend::Epoll,
            format!("io_uring is unavailable here ({e}), so the epoll fallback"),
        ),
    }
}

/// Runs `$body` with the type `$B` naming the engine
/// [`TestBackend::get`] picks (the body is compiled for both engines):
///
/// ```
/// use sessio_net::{Backend, on_test_backend};
/// let name = on_test_backend!(B => B::NAME);
/// assert!(name == "io_uring" || name == "epoll");
/// ```
#[macro_export]
macro_rules! on_test_backend {
    ($B:ident => $body:expr) => {
        match $crate::test_backend::TestBackend::get() {
            $crate::test_backend::TestBackend::IoUring => {
                type $B = $crate::IoUring;
                $body
            }
            $crate::test_backend::TestBackend::Epoll => {
                type $B = $crate::Epoll;
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_forces_epoll_and_rejects_nonsense() {
        assert_eq!(choose(Some("epoll")).0, TestBackend::Epoll);
        assert!(std::panic::catch_unwind(|| choose(Some("uring"))).is_err());
        let auto = choose(None).0;
        assert_eq!(auto == TestBackend::IoUring, IoUring::available());
    }
}

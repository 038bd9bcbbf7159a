//! The two I/O engines a [`crate::Client`] or [`crate::Server`] can run on:
//! [`IoUring`] (compio, completion-based, owned buffers) and [`Epoll`] (tokio,
//! readiness-based), behind one small trait so the protocol code above is
//! written once and a benchmark compares the engines carrying the same bytes.
//!
//! Both are single-threaded: run one runtime per thread (thread-per-core)
//! and several servers on one port with [`crate::SocketOptions::reuse_port`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::SocketOptions;
use crate::handshake::HANDSHAKE_FRAME_BYTES_MAX;

/// A fixed buffer for handshake frames.
pub(crate) type SmallBuf = [u8; HANDSHAKE_FRAME_BYTES_MAX];

/// The deadline passed.
#[derive(Debug, Clone, Copy)]
#[doc(hidden)]
pub struct Elapsed;

/// Byte-stream operations in owned-buffer style (the `io_uring` way; the epoll
/// side adapts to it at no cost).
///
/// The bulk operations take `&self`, so one read and one write can be in
/// flight on a connection at the same time (full duplex): never two reads
/// or two writes at once.
// The futures are not `Send`: every backend runs single-threaded runtimes.
#[allow(async_fn_in_trait)]
#[doc(hidden)]
pub trait Stream: 'static {
    /// Reads into the spare capacity of `buf` (never past its capacity),
    /// appending; `Ok(0)` is end of stream (or a full `buf`). The flag is
    /// true when the kernel reported more bytes already waiting in the
    /// socket after this read (`io_uring` tells, in the completion; false
    /// where unknown). `waiting` passes on that flag from the previous read:
    /// when it was false the socket is probably empty, and `io_uring` waits
    /// for readiness before its first attempt (`IORING_RECVSEND_POLL_FIRST`).
    async fn read_append(&self, buf: Vec<u8>, waiting: bool) -> (io::Result<usize>, bool, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Reads exactly `len` bytes into the front of `buf`.
    async fn read_exact_small(&mut self, buf: SmallBuf, len: usize) -> (io::Result<()>, SmallBuf);
    /// Writes the first `len` bytes of `buf`.
    async fn write_small(&mut self, buf: SmallBuf, len: usize) -> io::Result<()>;
}

/// An I/O engine: sockets, timers and task spawning of one runtime flavour.
#[allow(async_fn_in_trait)]
pub trait Backend: sealed::Sealed + 'static {
    /// Connected stream type.
    #[doc(hidden)]
    type Stream: Stream + std::os::fd::AsFd;
    /// Listener type.
    #[doc(hidden)]
    type Listener;
    /// Human-readable engine name, for logs and benchmark labels.
    const NAME: &'static str;
    #[doc(hidden)]
    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream>;
    #[doc(hidden)]
    fn listen(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Self::Listener>;
    /// Takes a bound, listening, non-blocking socket (see [`bind_listener`])
    /// into this engine; call inside its runtime.
    #[doc(hidden)]
    fn listener_from_std(listener: std::net::TcpListener) -> io::Result<Self::Listener>;
    #[doc(hidden)]
    async fn accept(listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)>;
    #[doc(hidden)]
    fn local_addr(listener: &Self::Listener) -> io::Result<SocketAddr>;
    #[doc(hidden)]
    async fn timeout<F: Future>(after: Duration, f: F) -> Result<F::Output, Elapsed>;
    #[doc(hidden)]
    async fn sleep(d: Duration);
    /// Runs `f` as a detached task on the current thread.
    #[doc(hidden)]
    fn spawn<F: Future<Output = ()> + 'static>(f: F);
    /// Runs `f` to completion with [`Backend::spawn`] available inside.
    #[doc(hidden)]
    async fn scope<F: Future>(f: F) -> F::Output;

    /// This engine's single-threaded runtime, kept across calls when
    /// sockets must stay registered with the runtime that opened them.
    type Runtime;
    /// Builds a runtime for this thread.
    ///
    /// # Errors
    ///
    /// When the engine cannot run here (`io_uring` missing or forbidden).
    fn runtime() -> io::Result<Self::Runtime>;
    /// Runs `f` to completion on `rt`.
    fn run<F: Future>(rt: &Self::Runtime, f: F) -> F::Output;
    /// Runs `f` to completion on a fresh runtime on this thread.
    ///
    /// # Panics
    ///
    /// When the runtime cannot be built: check [`Backend::available`] first.
    fn block_on<F: Future>(f: F) -> F::Output {
        Self::run(
            &Self::runtime().expect("runtime (check Backend::available first)"),
            f,
        )
    }
    /// Whether this engine works here (`io_uring` may be missing or
    /// forbidden by seccomp).
    fn available() -> bool {
        Self::runtime().is_ok()
    }
}

/// The parts of [`Backend`] whose text is the same for both engines: their
/// `TcpStream` and `TcpListener` (compio's, tokio's) have the same API, and
/// so do their timers and runtimes, so only the crate paths differ.
macro_rules! common_methods {
    (time: $($time:ident)::+, runtime: $rt:ty $(,)?) => {
        type Stream = TcpStream;
        type Listener = TcpListener;

        async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
            TcpStream::connect(addr).await
        }

        fn listen(addr: SocketAddr, opts: &SocketOptions) -> io::Result<TcpListener> {
            TcpListener::from_std(super::bind_listener(addr, opts)?)
        }

        fn listener_from_std(listener: std::net::TcpListener) -> io::Result<TcpListener> {
            TcpListener::from_std(listener)
        }

        async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
            listener.accept().await
        }

        fn local_addr(listener: &TcpListener) -> io::Result<SocketAddr> {
            listener.local_addr()
        }

        async fn timeout<F: Future>(after: Duration, f: F) -> Result<F::Output, Elapsed> {
            $($time)::+::timeout(after, f).await.map_err(|_| Elapsed)
        }

        async fn sleep(d: Duration) {
            $($time)::+::sleep(d).await;
        }

        type Runtime = $rt;

        fn run<F: Future>(rt: &$rt, f: F) -> F::Output {
            rt.block_on(f)
        }
    };
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::IoUring {}
    impl Sealed for super::Epoll {}
}

/// The `io_uring` engine (compio). Run inside a compio runtime.
#[derive(Debug, Clone, Copy)]
pub struct IoUring;

impl IoUring {
    /// A compio runtime for this thread, with the ring set up for one thread
    /// that owns it: `SINGLE_ISSUER` and `DEFER_TASKRUN` (completion work
    /// runs when the thread enters the kernel to wait, not as interrupts in
    /// the middle of handling a batch), `COOP_TASKRUN` and `TASKRUN_FLAG`.
    /// On a kernel that refuses these flags (before 6.1), a default ring.
    ///
    /// # Errors
    ///
    /// When `io_uring` is missing or forbidden (seccomp) here.
    pub fn runtime() -> io::Result<compio::runtime::Runtime> {
        let mut proactor = compio::driver::ProactorBuilder::new();
        proactor
            .single_issuer(true)
            .defer_taskrun(true)
            .coop_taskrun(true)
            .taskrun_flag(true);
        let tuned = compio::runtime::RuntimeBuilder::new()
            .with_proactor(proactor)
            .build();
        match tuned {
            Ok(rt) => Ok(rt),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => compio::runtime::Runtime::new(),
            Err(e) => Err(e),
        }
    }
}

/// The epoll engine (tokio, current-thread), the baseline `io_uring` must beat.
/// Run inside a tokio runtime with the I/O and time drivers enabled.
#[derive(Debug, Clone, Copy)]
pub struct Epoll;

/// A listening socket configured through socket2 (reuse-port, backlog), so
/// both engines bind the same way.
/// A bound, listening, non-blocking TCP socket configured by `opts`. One
/// such socket can be shared by several threads, each taking a clone
/// (`try_clone`) into its own runtime with
/// [`Server::from_listener`](crate::Server::from_listener): they then
/// accept from one queue, and no
/// other process can bind the port unless `opts.reuse_port` says so.
///
/// # Errors
///
/// When the socket cannot be made or bound (`AddrInUse` if the port is
/// taken).
pub fn bind_listener(addr: SocketAddr, opts: &SocketOptions) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(opts.listen_backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

mod uring {
    use compio::BufResult;
    use compio::buf::{IntoInner, IoBuf, IoBufMut};
    use compio::driver::op::{BufResultExt, Recv, RecvFlags};
    use compio::driver::{PollFirst, ToSharedFd};
    use compio::io::{AsyncReadExt, AsyncWriteExt};
    use compio::net::{TcpListener, TcpStream};

    use super::{Backend, Elapsed, IoUring, SmallBuf, SocketAddr, SocketOptions, Stream};
    use std::future::Future;
    use std::io;
    use std::time::Duration;

    impl Stream for TcpStream {
        async fn read_append(
            &self,
            buf: Vec<u8>,
            waiting: bool,
        ) -> (io::Result<usize>, bool, Vec<u8>) {
            // The receive is submitted by hand (not through `AsyncRead`) to
            // get the completion's flags: `IORING_CQE_F_SOCK_NONEMPTY` says
            // whether more bytes wait in the socket. It takes a shared
            // handle of the socket, so a write may be in flight meanwhile.
            // `uninit()` is the spare capacity after the bytes in `buf`.
            let mut op = Recv::new(self.to_shared_fd(), buf.uninit(), RecvFlags::empty());
            if !waiting {
                op.poll_first();
            }
            let (BufResult(res, op), extra) = compio::runtime::submit(op).with_extra().await;
            // SAFETY: on success the kernel wrote `n` bytes at the start of
            // the spare capacity, so the first `len + n` bytes of the vector
            // are initialized; on failure the length is left alone.
            let BufResult(res, buf) = unsafe { BufResult(res, op.into_inner()).map_advanced() };
            let more = matches!(res, Ok(n) if n > 0) && extra.sock_nonempty().unwrap_or(false);
            (res, more, buf.into_inner())
        }

        async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            let mut this = self;
            let BufResult(res, buf) = AsyncWriteExt::write_all(&mut this, buf).await;
            (res, buf)
        }

        async fn read_exact_small(
            &mut self,
            buf: SmallBuf,
            len: usize,
        ) -> (io::Result<()>, SmallBuf) {
            let BufResult(res, slice) = self.read_exact(buf.slice(..len)).await;
            (res, slice.into_inner())
        }

        async fn write_small(&mut self, buf: SmallBuf, len: usize) -> io::Result<()> {
            AsyncWriteExt::write_all(self, buf.slice(..len)).await.0
        }
    }

    impl Backend for IoUring {
        const NAME: &'static str = "io_uring";

        common_methods!(time: compio::time, runtime: compio::runtime::Runtime);

        fn spawn<F: Future<Output = ()> + 'static>(f: F) {
            // Dropping a compio JoinHandle cancels the task: detach instead.
            compio::runtime::spawn(f).detach();
        }

        async fn scope<F: Future>(f: F) -> F::Output {
            f.await
        }

        fn runtime() -> io::Result<compio::runtime::Runtime> {
            IoUring::runtime()
        }
    }
}

mod epoll {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Backend, Elapsed, Epoll, SmallBuf, SocketAddr, SocketOptions, Stream};
    use std::future::Future;
    use std::io;
    use std::time::Duration;

    impl Stream for TcpStream {
        async fn read_append(
            &self,
            mut buf: Vec<u8>,
            _waiting: bool,
        ) -> (io::Result<usize>, bool, Vec<u8>) {
            if buf.len() == buf.capacity() {
                return (Ok(0), false, buf);
            }
            // Through `&self` (readiness, then a non-blocking read), as
            // tokio's own split halves do. A `Vec` with spare capacity is
            // filled up to its capacity, never grown.
            loop {
                match self.try_read_buf(&mut buf) {
                    Ok(n) => return (Ok(n), false, buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return (Err(e), false, buf),
                }
                if let Err(e) = self.readable().await {
                    return (Err(e), false, buf);
                }
            }
        }

        async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            let mut done = 0;
            while done < buf.len() {
                match self.try_write(&buf[done..]) {
                    Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = self.writable().await {
                            return (Err(e), buf);
                        }
                    }
                    Err(e) => return (Err(e), buf),
                }
            }
            (Ok(()), buf)
        }

        async fn read_exact_small(
            &mut self,
            mut buf: SmallBuf,
            len: usize,
        ) -> (io::Result<()>, SmallBuf) {
            let res = self.read_exact(&mut buf[..len]).await.map(|_| ());
            (res, buf)
        }

        async fn write_small(&mut self, buf: SmallBuf, len: usize) -> io::Result<()> {
            AsyncWriteExt::write_all(self, &buf[..len]).await
        }
    }

    impl Backend for Epoll {
        const NAME: &'static str = "epoll";

        common_methods!(time: tokio::time, runtime: tokio::runtime::Runtime);

        fn spawn<F: Future<Output = ()> + 'static>(f: F) {
            drop(tokio::task::spawn_local(f));
        }

        async fn scope<F: Future>(f: F) -> F::Output {
            tokio::task::LocalSet::new().run_until(f).await
        }

        fn runtime() -> io::Result<tokio::runtime::Runtime> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
    }
}

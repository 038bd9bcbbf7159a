//! The peers sessio is compared with: a `redis-server` and a `memcached`
//! started on free loopback ports for the length of the run (killed and
//! reaped when dropped), and the smallest clients that speak to them.
//!
//! RESP and memcached's text protocol are written by hand: a web worker's
//! synchronous round trip and a pipelined burst are a few lines each, every
//! reply is checked, and no client library's buffering sits in the numbers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BoxError;

/// How long a freshly started server has to answer its first request.
const START_TIMEOUT_MS: u64 = 5_000;
/// Read/write timeout on every peer socket: a stuck peer fails the run.
const IO_TIMEOUT_MS: u64 = 10_000;

/// A free port on 127.0.0.1 (bound and released: another process could
/// take it in between, in which case the server fails to start and says so).
pub fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Whether `program` can be run (found on `PATH`).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A peer server process, killed and reaped when dropped; its scratch
/// directory is removed after it (fields drop after `drop` runs).
pub struct PeerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PeerProcess {
    /// Starts `redis-server` with persistence off on a free loopback port,
    /// and waits until it answers `PING`.
    pub fn redis() -> Result<PeerProcess, BoxError> {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("sessio-compare-redis-")
            .tempdir()?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut p = PeerProcess {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            _dir: Some(dir),
        };
        p.wait_ready(|addr| {
            let mut c = Resp::connect(addr)?;
            match c.call(&[b"PING"])? {
                Reply::Simple(s) if s == "PONG" => Ok(()),
                r => Err(format!("PING answered {r:?}").into()),
            }
        })?;
        Ok(p)
    }

    /// Starts `memcached` (one thread, 512 MiB) on a free loopback port,
    /// TCP only, and waits until it answers.
    pub fn memcached() -> Result<PeerProcess, BoxError> {
        let port = free_port()?;
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
            .args(["-m", "512", "-t", "1"]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // memcached refuses to run as root unless told which user to be.
            cmd.args(["-u", "root"]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let mut p = PeerProcess {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            _dir: None,
        };
        p.wait_ready(|addr| {
            let mut c = Memcache::connect(addr)?;
            c.get(b"sessio-probe").map(|_| ())
        })?;
        Ok(p)
    }

    fn wait_ready(
        &mut self,
        probe: impl Fn(SocketAddr) -> Result<(), BoxError>,
    ) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(
                    format!("exited at start ({status}); port {} taken?", self.addr).into(),
                );
            }
            match probe(self.addr) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "not answering on {} after {START_TIMEOUT_MS} ms: {e}",
                        self.addr
                    )
                    .into());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The socket under both clients, with their buffers: reads are buffered,
/// and requests are gathered in `out` until [`Conn::flush`], so a pipelined
/// burst is one write.
struct Conn {
    /// The peer's name, for errors.
    peer: &'static str,
    r: BufReader<TcpStream>,
    w: TcpStream,
    out: Vec<u8>,
    line: Vec<u8>,
    /// The bytes of the last reply that carried some (a RESP bulk string,
    /// a memcached value).
    payload: Vec<u8>,
}

impl Conn {
    fn open(peer: &'static str, addr: SocketAddr) -> Result<Conn, BoxError> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(IO_TIMEOUT_MS))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
        s.set_write_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
        Ok(Conn {
            peer,
            r: BufReader::with_capacity(64 * 1024, s.try_clone()?),
            w: s,
            out: Vec::with_capacity(64 * 1024),
            line: Vec::new(),
            payload: Vec::new(),
        })
    }

    /// Sends everything gathered in `out`.
    fn flush(&mut self) -> Result<(), BoxError> {
        self.w.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// The next line, without its CRLF.
    fn read_line(&mut self) -> Result<&[u8], BoxError> {
        self.line.clear();
        if self.r.read_until(b'\n', &mut self.line)? == 0 {
            return Err(format!("{} closed the connection", self.peer).into());
        }
        Ok(self.line.strip_suffix(b"\r\n").unwrap_or(&self.line))
    }

    /// `n` bytes and the CRLF after them, into `payload`.
    fn read_payload(&mut self, n: usize) -> Result<(), BoxError> {
        self.payload.resize(n + 2, 0);
        self.r.read_exact(&mut self.payload)?;
        if &self.payload[n..] != b"\r\n" {
            return Err(format!("{}: {n} bytes not ended by CRLF", self.peer).into());
        }
        self.payload.truncate(n);
        Ok(())
    }
}

/// One RESP reply (arrays are not needed by these workloads).
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `:n`.
    Int(i64),
    /// `$n` followed by n bytes (read and checked; the length is what the
    /// workloads use).
    Bulk(usize),
    /// `$-1`.
    Nil,
}

/// A RESP2 connection: commands are buffered by [`Resp::queue`] and sent by
/// [`Resp::flush`], so a pipeline is `queue` × n, `flush`, `read` × n.
pub struct Resp(Conn);

impl Resp {
    /// Connects to a Redis server.
    pub fn connect(addr: SocketAddr) -> Result<Resp, BoxError> {
        Conn::open("redis", addr).map(Resp)
    }

    /// Appends one command to the send buffer.
    pub fn queue(&mut self, args: &[&[u8]]) {
        let o = &mut self.0.out;
        o.push(b'*');
        o.extend_from_slice(args.len().to_string().as_bytes());
        o.extend_from_slice(b"\r\n");
        for a in args {
            o.push(b'$');
            o.extend_from_slice(a.len().to_string().as_bytes());
            o.extend_from_slice(b"\r\n");
            o.extend_from_slice(a);
            o.extend_from_slice(b"\r\n");
        }
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), BoxError> {
        self.0.flush()
    }

    /// Reads one reply; a Redis error reply is an error.
    pub fn read(&mut self) -> Result<Reply, BoxError> {
        let l = std::str::from_utf8(self.0.read_line()?)?;
        let (tag, rest) = l.split_at(1.min(l.len()));
        match tag {
            "+" => Ok(Reply::Simple(rest.to_string())),
            ":" => Ok(Reply::Int(rest.parse()?)),
            "-" => Err(format!("redis: {rest}").into()),
            "$" if rest == "-1" => Ok(Reply::Nil),
            "$" => {
                let n: usize = rest.parse()?;
                self.0.read_payload(n)?;
                Ok(Reply::Bulk(n))
            }
            _ => Err(format!("redis: unexpected reply line {l:?}").into()),
        }
    }

    /// Field `field` of `INFO section` (e.g. `used_memory` of `memory`).
    pub fn info(&mut self, section: &str, field: &str) -> Result<u64, BoxError> {
        match self.call(&[b"INFO", section.as_bytes()])? {
            Reply::Bulk(_) => {}
            r => return Err(format!("INFO answered {r:?}").into()),
        }
        let text = String::from_utf8_lossy(&self.0.payload);
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .ok_or_else(|| format!("INFO {section} has no {field}"))?
            .trim()
            .parse()
            .map_err(Into::into)
    }

    /// One synchronous round trip.
    pub fn call(&mut self, args: &[&[u8]]) -> Result<Reply, BoxError> {
        self.queue(args);
        self.flush()?;
        self.read()
    }
}

/// A memcached text-protocol connection.
pub struct Memcache(Conn);

impl Memcache {
    /// Connects to a memcached server.
    pub fn connect(addr: SocketAddr) -> Result<Memcache, BoxError> {
        Conn::open("memcached", addr).map(Memcache)
    }

    /// Queues `set key 0 0 len` (sent by [`Memcache::flush`]).
    pub fn queue_set(&mut self, key: &[u8], value: &[u8]) {
        let o = &mut self.0.out;
        o.extend_from_slice(b"set ");
        o.extend_from_slice(key);
        o.extend_from_slice(format!(" 0 0 {}\r\n", value.len()).as_bytes());
        o.extend_from_slice(value);
        o.extend_from_slice(b"\r\n");
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), BoxError> {
        self.0.flush()
    }

    /// Reads the answer to one `set`.
    pub fn read_stored(&mut self) -> Result<(), BoxError> {
        match self.0.read_line()? {
            b"STORED" => Ok(()),
            l => Err(format!("memcached set: {}", String::from_utf8_lossy(l)).into()),
        }
    }

    /// `get key`: the value's length on a hit.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<usize>, BoxError> {
        let o = &mut self.0.out;
        o.extend_from_slice(b"get ");
        o.extend_from_slice(key);
        o.extend_from_slice(b"\r\n");
        self.flush()?;
        let line = self.0.read_line()?;
        if line == b"END" {
            return Ok(None);
        }
        let text = std::str::from_utf8(line)?;
        let n: usize = match text.split(' ').collect::<Vec<_>>()[..] {
            ["VALUE", _key, _flags, n] => n.parse()?,
            _ => return Err(format!("memcached get: {text}").into()),
        };
        self.0.read_payload(n)?;
        match self.0.read_line()? {
            b"END" => Ok(Some(n)),
            l => Err(format!("memcached get: {}", String::from_utf8_lossy(l)).into()),
        }
    }
}

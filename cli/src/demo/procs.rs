//! Child processes of the demo: killed and reaped on drop, and killed by
//! the kernel if the driver itself dies (`PR_SET_PDEATHSIG`).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::Sender;

/// A child process, sent SIGCONT (it may be stopped), killed with SIGKILL
/// and reaped on drop.
pub(crate) struct Proc {
    child: std::process::Child,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd`; the child dies with the driver's thread.
    pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
        // SAFETY: the closure runs between fork and exec and calls only
        // `prctl` and `getppid`, both async-signal-safe; it touches no
        // memory shared with other threads.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The driver died between fork and prctl: do not outlive it.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        Ok(Proc {
            child: cmd.spawn()?,
            reaped: false,
        })
    }

    pub(crate) fn signal(&self, sig: libc::c_int) {
        if self.reaped {
            return;
        }
        // SAFETY: a plain syscall on our own, not yet reaped child, so the
        // pid cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill9(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    pub(crate) fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub(crate) fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// A `sessio node` process.
pub(crate) struct NodeProc {
    pub(crate) id: u16,
    pub(crate) addr: SocketAddr,
    pub(crate) proc: Proc,
    _stdout: BufReader<ChildStdout>,
}

impl NodeProc {
    /// Starts a node and waits for the address it bound.
    pub(crate) fn spawn(
        exe: &Path,
        id: u16,
        listen: SocketAddr,
        secret: &Path,
    ) -> Result<NodeProc, String> {
        let mut proc = Proc::spawn(
            Command::new(exe)
                .args(["node", "--listen", &listen.to_string(), "--node-id"])
                .arg(id.to_string())
                .arg("--secret-file")
                .arg(secret)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .map_err(|e| format!("spawning node {id}: {e}"))?;
        let mut stdout = BufReader::new(proc.take_stdout().ok_or("node stdout")?);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("node {id}: {e}"))?;
        // "listening ADDR node N incarnation X"
        let addr = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("node {id} did not start (printed {line:?})"))?;
        Ok(NodeProc {
            id,
            addr,
            proc,
            _stdout: stdout,
        })
    }
}

/// What a worker's reader thread forwards: `(worker, Some(line))`, or
/// `(worker, None)` once its stdout closed (the worker died).
pub(crate) type Line = (usize, Option<String>);

/// A `sessio demo-worker` process with its request pipe.
pub(crate) struct WorkerProc {
    pub(crate) proc: Proc,
    pub(crate) stdin: Option<BufWriter<ChildStdin>>,
}

impl WorkerProc {
    /// Starts a worker; a thread forwards its answer lines to `tx`.
    pub(crate) fn spawn(cmd: &mut Command, index: usize, tx: Sender<Line>) -> Result<Self, String> {
        let mut proc = Proc::spawn(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .map_err(|e| format!("spawning worker {index}: {e}"))?;
        let stdin = BufWriter::new(proc.take_stdin().ok_or("worker stdin")?);
        let stdout = BufReader::new(proc.take_stdout().ok_or("worker stdout")?);
        std::thread::Builder::new()
            .name(format!("demo-worker-{index}"))
            .spawn(move || {
                for line in stdout.lines() {
                    let Ok(line) = line else { break };
                    if tx.send((index, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, None));
            })
            .map_err(|e| format!("reader thread: {e}"))?;
        Ok(WorkerProc {
            proc,
            stdin: Some(stdin),
        })
    }

    /// Queues one request line (sent on [`WorkerProc::flush`]). A dead
    /// worker's pipe is dropped; its reader reports the death.
    pub(crate) fn send(&mut self, line: &str) {
        if let Some(w) = self.stdin.as_mut()
            && writeln!(w, "{line}").is_err()
        {
            self.stdin = None;
        }
    }

    pub(crate) fn flush(&mut self) {
        if let Some(w) = self.stdin.as_mut()
            && w.flush().is_err()
        {
            self.stdin = None;
        }
    }

    pub(crate) fn kill9(&mut self) {
        self.stdin = None;
        self.proc.kill9();
    }
}

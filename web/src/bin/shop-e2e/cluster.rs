//! The processes of a run: replica nodes, shop hosts, nginx, redis-server.
//! Each is started in its own process group and ended with it, so a host's
//! workers go with their host; whatever is still running when the
//! [`Cluster`] drops is killed, and the arenas are removed.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::BoxError;

/// How long a process may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A process we started, in its own process group.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd` in a new process group; if `announce` is given, waits
    /// for the first stdout line starting with it and returns what follows
    /// (the address it listens on).
    fn start(
        name: &str,
        mut cmd: Command,
        announce: Option<&str>,
    ) -> Result<(Proc, Option<String>), BoxError> {
        cmd.process_group(0);
        if announce.is_some() {
            cmd.stdout(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", cmd.get_program().display()))?;
        let Some(prefix) = announce else {
            return Ok((
                Proc {
                    name: name.into(),
                    child,
                },
                None,
            ));
        };
        let out = child.stdout.take().expect("piped above");
        let (tx, rx) = mpsc::channel();
        let prefix = prefix.to_string();
        // The reader keeps draining stdout after the announcement, so the
        // process never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(rest) = line.strip_prefix(&prefix) {
                    let _ = tx.send(rest.trim().to_string());
                    sent = true;
                }
            }
        });
        let mut p = Proc {
            name: name.into(),
            child,
        };
        if let Ok(rest) = rx.recv_timeout(START_TIMEOUT) {
            Ok((p, Some(rest)))
        } else {
            p.kill();
            Err(format!("{} did not start within {START_TIMEOUT:?}", p.name).into())
        }
    }

    /// CPU time used so far by every process of its group, in clock ticks
    /// (from `/proc`; processes already gone are not counted).
    pub fn cpu_ticks(&self) -> u64 {
        let pgid = self.child.id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter_map(|stat| {
                // Fields after the command name, which is in parentheses.
                let rest = &stat[stat.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                // state ppid pgrp ... utime(14th field overall) stime(15th)
                let pgrp: u32 = f.get(2)?.parse().ok()?;
                let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                (pgrp == pgid).then_some(ticks)
            })
            .sum()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL to the whole group, then reaps.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the process group we created for this child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM to the group leader, then SIGKILL to the group if it has not
    /// ended within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < grace {
            if !self.alive() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.kill();
        }
    }
}

/// CPU ticks used so far, by role.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTicks {
    hosts: u64,
    nodes: u64,
    nginx: u64,
    redis: u64,
}

impl CpuTicks {
    /// What was used since `before`, over `secs` seconds, as percent of
    /// one core per role.
    pub fn since(&self, before: &CpuTicks, secs: u64) -> String {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let pct = |now: u64, then: u64| now.saturating_sub(then) * 100 / (hz * secs.max(1));
        format!(
            "hosts={}% nodes={}% nginx={}% redis={}%",
            pct(self.hosts, before.hosts),
            pct(self.nodes, before.nodes),
            pct(self.nginx, before.nginx),
            pct(self.redis, before.redis)
        )
    }
}

/// A shop host.
pub struct ShopHost {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// Everything a run started, ended on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub secret: PathBuf,
    pub nodes: Vec<(u16, Proc, SocketAddr)>,
    pub hosts: Vec<ShopHost>,
    pub nginx: Option<(Proc, SocketAddr)>,
    pub redis: Option<(Proc, SocketAddr)>,
    /// Arena names of this run, removed at the end.
    arenas: Vec<String>,
    tag: String,
}

/// A free port on loopback (bound and released: another process could take
/// it meanwhile, which only fails the start with a clear error).
pub fn free_addr() -> Result<SocketAddr, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Cluster {
    /// A temporary directory with the bank's secret.
    pub fn new() -> Result<Cluster, BoxError> {
        let dir = tempfile::Builder::new().prefix("shop-e2e-").tempdir()?;
        let secret = dir.path().join("bank.key");
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("no random bytes: {e}"))?;
        std::fs::write(&secret, key)?;
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Cluster {
            tag: format!("e2e{}", std::process::id()),
            dir,
            secret,
            nodes: Vec::new(),
            hosts: Vec::new(),
            nginx: None,
            redis: None,
            arenas: Vec::new(),
        })
    }

    /// Starts replica node `id` (this executable, `node` mode).
    pub fn start_node(&mut self, id: u16) -> Result<(), BoxError> {
        self.start_node_at(id, "127.0.0.1:0".parse()?)
    }

    fn start_node_at(&mut self, id: u16, listen: SocketAddr) -> Result<(), BoxError> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "node",
            "--id",
            &id.to_string(),
            "--listen",
            &listen.to_string(),
        ])
        .arg("--secret-file")
        .arg(&self.secret);
        let (p, addr) = Proc::start(&format!("node {id}"), cmd, Some("node: listening"))?;
        let addr = addr.expect("announced").parse()?;
        self.nodes.push((id, p, addr));
        Ok(())
    }

    /// CPU time used so far by the hosts (workers included), the nodes,
    /// nginx and redis-server.
    pub fn cpu_ticks(&self) -> CpuTicks {
        CpuTicks {
            hosts: self.hosts.iter().map(|h| h.proc.cpu_ticks()).sum(),
            nodes: self.nodes.iter().map(|(_, p, _)| p.cpu_ticks()).sum(),
            nginx: self.nginx.as_ref().map_or(0, |(p, _)| p.cpu_ticks()),
            redis: self.redis.as_ref().map_or(0, |(p, _)| p.cpu_ticks()),
        }
    }

    /// Kills every node and starts it again, empty, at the same address.
    pub fn restart_nodes_empty(&mut self) -> Result<(), BoxError> {
        let old: Vec<(u16, SocketAddr)> = self.nodes.iter().map(|(id, _, a)| (*id, *a)).collect();
        for (_, mut p, _) in self.nodes.drain(..) {
            p.kill();
        }
        for (id, addr) in old {
            self.start_node_at(id, addr)?;
        }
        Ok(())
    }

    /// `id=addr,...` of the nodes.
    pub fn members(&self) -> String {
        self.nodes
            .iter()
            .map(|(id, _, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts shop host `host_id` with `workers` workers in `mode`.
    pub fn start_host(&mut self, host_id: u64, workers: usize, way: &str) -> Result<(), BoxError> {
        let arena = format!("{}-{way}-h{host_id}", self.tag);
        // `native-solo` is the native layer with no replicator: what the
        // sessions cost the host without the bank's share (a diagnostic).
        let (mode, solo) = match way {
            "native-solo" => ("native", true),
            m => (m, false),
        };
        let _ = sessio_engine::Arena::remove(&sessio_engine::Location::Shm(arena.clone()));
        self.arenas.push(arena.clone());
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("shop")
            .arg(format!("--workers={workers}"))
            .arg(format!("--arena={arena}"))
            .arg("--capacity=20000")
            .arg(format!("--nodes={}", self.members()))
            .arg(format!("--host-id={host_id}"))
            .arg(format!("--mode={mode}"))
            .arg("--secret-file")
            .arg(&self.secret);
        if solo {
            cmd.arg("--no-replicator");
        }
        if let Some((_, addr)) = &self.redis {
            cmd.arg(format!("--redis={addr}"));
        }
        let (p, addr) = Proc::start(&format!("host {host_id}"), cmd, Some("shop: listening"))?;
        let addr = addr
            .expect("announced")
            .split_whitespace()
            .next()
            .ok_or("host announced no address")?
            .parse()?;
        self.hosts.push(ShopHost { proc: p, addr });
        Ok(())
    }

    /// Stops every host (cleanly) and forgets them.
    pub fn stop_hosts(&mut self) {
        for mut h in self.hosts.drain(..) {
            h.proc.stop(Duration::from_secs(5));
        }
        self.remove_arenas();
    }

    fn remove_arenas(&mut self) {
        for a in self.arenas.drain(..) {
            let _ = sessio_engine::Arena::remove(&sessio_engine::Location::Shm(a));
        }
    }

    /// Starts nginx in front of the hosts: sessions pinned to a host by
    /// their cookie (`hash $cookie_id consistent`), the next host on an
    /// error or a 502.
    pub fn start_nginx(&mut self) -> Result<SocketAddr, BoxError> {
        if let Some((mut p, _)) = self.nginx.take() {
            p.stop(Duration::from_secs(5));
        }
        let addr = free_addr()?;
        let dir = self.dir.path().join("nginx");
        std::fs::create_dir_all(dir.join("logs"))?;
        let conf = nginx_conf(&dir, addr, &self.hosts);
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx = which("nginx").ok_or(
            "nginx is not installed (Debian: apt-get install nginx-light); the e2e run needs it",
        )?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null());
        let (p, _) = Proc::start("nginx", cmd, None)?;
        wait_listening(addr, "nginx")?;
        self.nginx = Some((p, addr));
        Ok(addr)
    }

    /// Starts a redis-server of our own on a free port.
    pub fn start_redis(&mut self) -> Result<SocketAddr, BoxError> {
        let addr = free_addr()?;
        let redis = which("redis-server").ok_or(
            "redis-server is not installed (Debian: apt-get install redis-server); the comparison needs it",
        )?;
        let mut cmd = Command::new(redis);
        cmd.args([
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(self.dir.path())
        .stdout(Stdio::null());
        let (p, _) = Proc::start("redis-server", cmd, None)?;
        wait_listening(addr, "redis-server")?;
        self.redis = Some((p, addr));
        Ok(addr)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut p, _)) = self.nginx.take() {
            p.stop(Duration::from_secs(2));
        }
        for mut h in self.hosts.drain(..) {
            h.proc.stop(Duration::from_secs(2));
        }
        for (_, mut p, _) in self.nodes.drain(..) {
            p.stop(Duration::from_secs(2));
        }
        if let Some((mut p, _)) = self.redis.take() {
            p.stop(Duration::from_secs(2));
        }
        self.remove_arenas();
    }
}

/// nginx as the local director of `hosts`.
fn nginx_conf(dir: &Path, listen: SocketAddr, hosts: &[ShopHost]) -> String {
    let mut servers = String::new();
    for h in hosts {
        let _ = writeln!(
            servers,
            "        server {} max_fails=1 fail_timeout=2s;",
            h.addr
        );
    }
    let d = dir.display();
    format!(
        "worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   upstream shop {{\n\
         \x20       hash $cookie_id consistent;\n\
         {servers}\
         \x20       keepalive 64;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://shop;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_next_upstream error timeout http_502;\n\
         \x20           proxy_connect_timeout 1s;\n\
         \x20           proxy_read_timeout 10s;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    )
}

/// The path of `prog` on `PATH` (or in the sbin directories, where Debian
/// puts nginx).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

fn wait_listening(addr: SocketAddr, name: &str) -> Result<(), BoxError> {
    let t = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if t.elapsed() > START_TIMEOUT {
            return Err(format!("{name} does not listen on {addr}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

//! Prometheus text metrics for `sessio node` and `sessio agent`
//! (`--metrics-addr ADDR`, `GET /metrics`).
//!
//! A small blocking HTTP/1.1 server on its own thread, one connection at a
//! time (a scraper is one client; each request is bounded in bytes and
//! time). The agent renders its replicator's stats. The node renders the
//! counters it answers to a `StatsRequest`: on each scrape the thread
//! connects to its own node over the authenticated protocol, so the node's
//! single-threaded store is never shared with another thread.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sessio_net::{Client, ClientConfig, Epoll, Identity, IoUring, Message, Secret, StatsRequest};

use sessio_remote::replicator::{Replicator, ReplicatorStats};
use sessio_remote::runtime::Rt;

/// Largest request head read.
const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Time a scraper has to send its request, and to read the answer.
const IO_TIMEOUT_MS: u64 = 2000;
/// How often the accept loop checks for stop.
const ACCEPT_POLL_MS: u64 = 50;
/// Time allowed to fetch a node's counters.
const NODE_STATS_TIMEOUT_MS: u64 = 1000;

/// A running metrics endpoint; stopped and joined on drop.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The bound address (port 0 picks one).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(
        addr: SocketAddr,
        render: impl Fn() -> String + Send + 'static,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("sessio-metrics".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                // A broken scrape affects only itself.
                                let _ = answer(conn, &render);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS)),
                        }
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut conn: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
    conn.set_write_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_BYTES_MAX {
            return respond(&mut conn, "431 Request Header Fields Too Large", "");
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => respond(&mut conn, "200 OK", &render()),
        ("GET", _) => respond(&mut conn, "404 Not Found", "try /metrics\n"),
        _ => respond(&mut conn, "405 Method Not Allowed", ""),
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// A node's answer to a stats request: its incarnation and named counters.
pub type NodeCounters = (u64, Vec<(String, u64)>);

/// One per-node family of the replicator: name suffix, type, help, value.
type NodeFamily<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a dyn Fn(&sessio_remote::replicator::NodeStats) -> u64,
);

/// Prometheus text exposition, one family at a time.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {v}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
            }
        }
    }

    /// The lag histogram, cumulative as Prometheus wants it, so quantiles
    /// over any window can be computed from two scrapes.
    #[allow(clippy::cast_precision_loss)] // seconds for display
    fn lag_histogram(&mut self, s: &ReplicatorStats) {
        let name = "sessio_replicator_lag_histogram_seconds";
        let _ = writeln!(
            self.0,
            "# HELP {name} Update-to-acknowledgement lag by R nodes, in power-of-two buckets of microseconds."
        );
        let _ = writeln!(self.0, "# TYPE {name} histogram");
        let mut seen = 0u64;
        let last = s.lag_buckets.len() - 1;
        for (b, n) in s.lag_buckets.iter().enumerate().take(last) {
            seen += n;
            let le = (1u64 << b) as f64 / 1e6;
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {seen}");
        }
        seen += s.lag_buckets[last];
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {seen}");
        let _ = writeln!(self.0, "{name}_sum {}", s.lag_sum_us as f64 / 1e6);
        let _ = writeln!(self.0, "{name}_count {seen}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        #[allow(clippy::cast_precision_loss)]
        self.family(name, kind, help, &[(String::new(), v as f64)]);
    }
}

/// Serves the agent's replicator stats.
pub fn serve_agent(addr: SocketAddr, repl: Arc<Replicator>) -> std::io::Result<MetricsServer> {
    MetricsServer::spawn(addr, move || render_agent(&repl.stats()))
}

/// The replicator's stats as Prometheus text.
#[allow(clippy::cast_precision_loss)]
pub fn render_agent(s: &ReplicatorStats) -> String {
    let mut e = Exposition::default();
    e.one(
        "sessio_replicator_dirty_sessions",
        "gauge",
        "Sessions whose current version is not yet acknowledged by R nodes.",
        s.dirty,
    );
    e.one(
        "sessio_replicator_bytes_sent_total",
        "counter",
        "Bytes of batches sent, all nodes.",
        s.bytes_sent,
    );
    e.one(
        "sessio_replicator_bytes_per_second",
        "gauge",
        "Bytes sent per second over the last full second.",
        s.bytes_per_sec,
    );
    e.one(
        "sessio_replicator_ticks_total",
        "counter",
        "Dispatcher ticks run.",
        s.ticks,
    );
    e.one(
        "sessio_replicator_lag_samples_total",
        "counter",
        "Sessions that reached R acknowledgements (lag samples).",
        s.lag_samples,
    );
    let secs = |us: u64| us as f64 / 1e6;
    e.family(
        "sessio_replicator_lag_seconds",
        "gauge",
        "Update-to-acknowledgement lag by R nodes (upper bound of a power-of-two bucket; max is exact).",
        &[
            ("quantile=\"0.5\"".into(), secs(s.lag_p50_us)),
            ("quantile=\"0.99\"".into(), secs(s.lag_p99_us)),
            ("quantile=\"1\"".into(), secs(s.lag_max_us)),
        ],
    );
    e.lag_histogram(s);
    let per_node =
        |f: &dyn Fn(&sessio_remote::replicator::NodeStats) -> u64| -> Vec<(String, f64)> {
            s.nodes
                .iter()
                .map(|n| (format!("node=\"{}\"", n.id), f(n) as f64))
                .collect()
        };
    let families: [NodeFamily<'_>; 11] = [
        ("up", "gauge", "Whether the link to the node is up.", &|n| {
            u64::from(n.up)
        }),
        (
            "pending_sessions",
            "gauge",
            "Sessions waiting to be sent to the node.",
            &|n| n.pending,
        ),
        (
            "in_flight_entries",
            "gauge",
            "Entries sent, not yet acknowledged.",
            &|n| n.in_flight,
        ),
        (
            "owed_sessions",
            "gauge",
            "Sessions owed to the node while it is down.",
            &|n| n.owed,
        ),
        (
            "applied_total",
            "counter",
            "Entries the node applied.",
            &|n| n.applied,
        ),
        (
            "need_full_total",
            "counter",
            "Entries the node answered NeedFull.",
            &|n| n.need_full,
        ),
        (
            "fenced_total",
            "counter",
            "Entries the node fenced (a newer owner holds them).",
            &|n| n.fenced,
        ),
        (
            "refused_total",
            "counter",
            "Entries the node refused.",
            &|n| n.refused,
        ),
        (
            "bytes_sent_total",
            "counter",
            "Bytes of batches sent to the node.",
            &|n| n.bytes_sent,
        ),
        (
            "connects_total",
            "counter",
            "Successful handshakes with the node.",
            &|n| n.connects,
        ),
        (
            "new_incarnations_total",
            "counter",
            "Handshakes that showed a restarted node.",
            &|n| n.new_incarnations,
        ),
    ];
    for (name, kind, help, f) in families {
        e.family(
            &format!("sessio_replicator_node_{name}"),
            kind,
            help,
            &per_node(f),
        );
    }
    if let Some(a) = &s.arena {
        render_arena(&mut e, a);
    }
    e.0
}

/// The host arena's counters, as the agent last read them.
fn render_arena(e: &mut Exposition, a: &sessio_engine::ArenaStats) {
    let rows: [(&str, &str, &str, u64); 9] = [
        (
            "live_sessions",
            "gauge",
            "Live sessions in the arena.",
            a.live,
        ),
        (
            "capacity_sessions",
            "gauge",
            "Session capacity of the arena.",
            a.capacity,
        ),
        (
            "heap_chunks_used",
            "gauge",
            "Heap chunks ever handed to size classes (high-water mark).",
            a.chunks_used,
        ),
        ("heap_chunks", "gauge", "Heap chunks in all.", a.chunks),
        (
            "handles",
            "gauge",
            "Arena handles open now, all processes.",
            u64::from(a.handles),
        ),
        (
            "collections_total",
            "counter",
            "Online collections run.",
            a.collections,
        ),
        (
            "leaked_blocks_returned_total",
            "counter",
            "Heap blocks lost by killed processes that collections found and gave back.",
            a.leaked_blocks_returned,
        ),
        (
            "chunks_returned_total",
            "counter",
            "Wholly free heap chunks collections gave back to the pool.",
            a.chunks_returned,
        ),
        (
            "collect_suspects",
            "gauge",
            "Processes found dead inside an update since the last collection.",
            a.suspects,
        ),
    ];
    for (name, kind, help, v) in rows {
        e.one(&format!("sessio_arena_{name}"), kind, help, v);
    }
    #[allow(clippy::cast_precision_loss)]
    e.family(
        "sessio_arena_last_collect_pause_seconds",
        "gauge",
        "How long the last collection held updates (reads never wait).",
        &[(String::new(), a.last_collect_pause_us as f64 / 1e6)],
    );
}

/// Serves the counters of the node `node_id` listening on `node`.
pub fn serve_node(
    addr: SocketAddr,
    node: SocketAddr,
    node_id: u16,
    secret: Secret,
) -> std::io::Result<MetricsServer> {
    MetricsServer::spawn(addr, move || {
        let stats = if IoUring::available() {
            node_stats::<IoUring>(node, node_id, &secret)
        } else {
            node_stats::<Epoll>(node, node_id, &secret)
        };
        render_node(node_id, stats.as_ref().map_err(String::as_str))
    })
}

/// The node's `(incarnation, counters)`, asked over the protocol.
fn node_stats<B: Rt>(
    node: SocketAddr,
    node_id: u16,
    secret: &Secret,
) -> Result<NodeCounters, String> {
    B::block_on(async {
        let identity = Identity::with_random_incarnation(0xffff_0000 + u64::from(node_id))
            .map_err(|e| e.to_string())?;
        let mut cc = ClientConfig::new(identity);
        cc.handshake_timeout_ms = NODE_STATS_TIMEOUT_MS;
        cc.io_timeout_ms = NODE_STATS_TIMEOUT_MS;
        let mut c = Client::<B>::connect(node, cc, secret.clone())
            .await
            .map_err(|e| e.to_string())?;
        let reply = B::timeout(
            Duration::from_millis(NODE_STATS_TIMEOUT_MS),
            c.call(&Message::StatsRequest(StatsRequest { request_id: 1 })),
        )
        .await
        .map_err(|_| "stats request timed out".to_string())?
        .map_err(|e| e.to_string())?;
        match reply {
            Message::Stats(s) => Ok((
                s.incarnation,
                s.counters.into_iter().map(|c| (c.name, c.value)).collect(),
            )),
            other => Err(format!("unexpected reply {:?}", other.kind())),
        }
    })
}

/// A node's counters as Prometheus text; `Err` renders `up 0`.
#[allow(clippy::cast_precision_loss)]
pub fn render_node(node_id: u16, stats: Result<&NodeCounters, &str>) -> String {
    let mut e = Exposition::default();
    let label = format!("node=\"{node_id}\"");
    let up = stats.is_ok();
    e.family(
        "sessio_node_up",
        "gauge",
        "Whether the node answered this scrape's stats request.",
        &[(label.clone(), if up { 1.0 } else { 0.0 })],
    );
    let Ok((incarnation, counters)) = stats else {
        return e.0;
    };
    e.family(
        "sessio_node_info",
        "gauge",
        "The node's current incarnation (random per start).",
        &[(format!("{label},incarnation=\"{incarnation:016x}\""), 1.0)],
    );
    for (name, value) in counters {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        // The store's sizes are gauges; everything else only grows.
        let (family, kind) = if name == "sessions" || name == "bytes" {
            (format!("sessio_node_{name}"), "gauge")
        } else {
            (format!("sessio_node_{name}_total"), "counter")
        };
        e.family(
            &family,
            kind,
            &format!("The node's {name} counter."),
            &[(label.clone(), *value as f64)],
        );
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_text_has_gauges_and_counters() {
        let stats = (
            0xabcu64,
            vec![("sessions".to_string(), 3), ("applied".to_string(), 9)],
        );
        let t = render_node(2, Ok(&stats));
        assert!(t.contains("sessio_node_up{node=\"2\"} 1\n"), "{t}");
        assert!(
            t.contains("# TYPE sessio_node_sessions gauge\nsessio_node_sessions{node=\"2\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE sessio_node_applied_total counter\n"),
            "{t}"
        );
        assert!(t.contains("incarnation=\"0000000000000abc\""), "{t}");
        let t = render_node(2, Err("refused"));
        assert!(
            t.contains("sessio_node_up{node=\"2\"} 0\n") && !t.contains("sessions"),
            "{t}"
        );
    }

    #[test]
    fn agent_text_lists_every_node() {
        let s = ReplicatorStats {
            dirty: 4,
            lag_p99_us: 1500,
            lag_buckets: {
                let mut b = [0; sessio_remote::replicator::LAG_BUCKETS];
                b[0] = 1;
                b[10] = 2;
                b[31] = 1;
                b
            },
            lag_sum_us: 2500,
            nodes: vec![
                sessio_remote::replicator::NodeStats {
                    id: 1,
                    up: true,
                    ..Default::default()
                },
                sessio_remote::replicator::NodeStats {
                    id: 7,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let t = render_agent(&s);
        assert!(t.contains("sessio_replicator_dirty_sessions 4\n"), "{t}");
        assert!(
            t.contains("sessio_replicator_lag_seconds{quantile=\"0.99\"} 0.0015\n"),
            "{t}"
        );
        for line in [
            "# TYPE sessio_replicator_lag_histogram_seconds histogram\n",
            "sessio_replicator_lag_histogram_seconds_bucket{le=\"0.000001\"} 1\n",
            "sessio_replicator_lag_histogram_seconds_bucket{le=\"0.000512\"} 1\n",
            "sessio_replicator_lag_histogram_seconds_bucket{le=\"0.001024\"} 3\n",
            "sessio_replicator_lag_histogram_seconds_bucket{le=\"1073.741824\"} 3\n",
            "sessio_replicator_lag_histogram_seconds_bucket{le=\"+Inf\"} 4\n",
            "sessio_replicator_lag_histogram_seconds_sum 0.0025\n",
            "sessio_replicator_lag_histogram_seconds_count 4\n",
        ] {
            assert!(t.contains(line), "{line} in {t}");
        }
        assert!(
            t.contains("sessio_replicator_node_up{node=\"1\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("sessio_replicator_node_up{node=\"7\"} 0\n"),
            "{t}"
        );
        assert!(!t.contains("sessio_arena_"), "no arena read yet: {t}");
    }

    #[test]
    fn agent_text_has_the_arena_and_its_collector() {
        let s = ReplicatorStats {
            arena: Some(sessio_engine::ArenaStats {
                live: 10,
                capacity: 100,
                created_total: 12,
                expired_total: 2,
                chunks_used: 3,
                chunks: 8,
                chunk_bytes: 65536,
                mapped_bytes: 1 << 20,
                handles: 4,
                recoveries: 1,
                collections: 5,
                leaked_blocks_returned: 7,
                chunks_returned: 2,
                suspects: 1,
                last_collect_pause_us: 1500,
            }),
            ..Default::default()
        };
        let t = render_agent(&s);
        for line in [
            "sessio_arena_live_sessions 10\n",
            "# TYPE sessio_arena_collections_total counter\nsessio_arena_collections_total 5\n",
            "sessio_arena_leaked_blocks_returned_total 7\n",
            "sessio_arena_chunks_returned_total 2\n",
            "# TYPE sessio_arena_collect_suspects gauge\nsessio_arena_collect_suspects 1\n",
            "sessio_arena_last_collect_pause_seconds 0.0015\n",
        ] {
            assert!(t.contains(line), "{line} in {t}");
        }
    }
}

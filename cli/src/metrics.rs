//! Prometheus text metrics for `sessio node` and `sessio agent`
//! (`--metrics-addr ADDR`, `GET /metrics`).
//!
//! The text is written by `prometheus-client`'s encoder of the Prometheus
//! text format (version 0.0.4), from a collector that reads the counters on
//! each scrape. The agent renders its replicator's stats. The node renders
//! the counters it answers to a `StatsRequest`: on each scrape the
//! collector connects to its own node over the authenticated protocol, so
//! the node's single-threaded store is never shared with another thread.
//!
//! The HTTP side is a small blocking HTTP/1.1 server: one thread accepts,
//! and one thread per connection answers, at most [`CONNECTIONS_MAX`] at
//! once. A connection has [`REQUEST_DEADLINE_MS`] in all to send its
//! request head of at most [`REQUEST_BYTES_MAX`], however it paces its
//! bytes: a client that trickles a byte at a time is cut off at the
//! deadline and never delays the others.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, MetricEncoder,
    NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType::{self, Counter, Gauge};
use prometheus_client::registry::Registry;
use sessio_net::{Client, ClientConfig, Epoll, Identity, IoUring, Message, Secret, StatsRequest};

use sessio_remote::replicator::{LAG_BUCKETS, NodeStats, Replicator, ReplicatorStats};
use sessio_remote::runtime::Rt;

/// Largest request head read.
const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Time a client has to send its whole request head, from its accept.
const REQUEST_DEADLINE_MS: u64 = 2000;
/// Time each write of an answer may block on a client that does not read.
const WRITE_TIMEOUT_MS: u64 = 2000;
/// Connections answered at once; one more is closed at once.
const CONNECTIONS_MAX: usize = 16;
/// How often the accept loop checks for stop.
const ACCEPT_POLL_MS: u64 = 50;
/// Time allowed to fetch a node's counters.
const NODE_STATS_TIMEOUT_MS: u64 = 1000;

/// A running metrics endpoint; stopped and joined on drop (connections
/// still open end within their deadline).
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

    fn spawn(addr: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("sessio-metrics".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || accept_loop(&listener, &Arc::new(registry), &stop)
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

fn accept_loop(listener: &TcpListener, registry: &Arc<Registry>, stop: &AtomicBool) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                conns.retain(|c| !c.is_finished());
                if conns.len() >= CONNECTIONS_MAX {
                    // Closed at once, unread: an answer could be lost to
                    // the reset that closing with unread bytes sends, and
                    // reading first would hold this loop. A scraper sees
                    // a failed scrape and retries.
                    drop(conn);
                    continue;
                }
                let registry = Arc::clone(registry);
                // A broken scrape affects only itself; a failed spawn drops
                // (closes) the connection.
                if let Ok(t) = std::thread::Builder::new()
                    .name("sessio-metrics-conn".into())
                    .spawn(move || {
                        let _ = answer(conn, &registry);
                    })
                {
                    conns.push(t);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS)),
        }
    }
    // Each ends within its request deadline and write timeouts; joining
    // them lets the owner of what the registry reads (the agent's
    // replicator) be the last one holding it.
    for c in conns {
        let _ = c.join();
    }
}

/// How reading a request head ended.
enum Head {
    /// The head, up to its blank line.
    Complete(Vec<u8>),
    /// The client closed before finishing it.
    Closed,
    /// More than [`REQUEST_BYTES_MAX`].
    TooLarge,
    /// Not finished within [`REQUEST_DEADLINE_MS`].
    Late,
}

/// Reads a request head within the deadline. The read timeout is set to
/// the time left before each read: a timeout alone restarts with every
/// byte, so a client sending one byte just before each timeout would
/// hold the connection forever.
fn read_head(conn: &mut TcpStream) -> std::io::Result<Head> {
    let deadline = Instant::now() + Duration::from_millis(REQUEST_DEADLINE_MS);
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::Late);
        }
        conn.set_read_timeout(Some(left))?;
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::Late);
            }
            Err(e) => return Err(e),
        };
        // The blank line may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Head::Complete(head));
        }
        if head.len() > REQUEST_BYTES_MAX {
            return Ok(Head::TooLarge);
        }
    }
}

fn answer(mut conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)))?;
    let head = match read_head(&mut conn)? {
        Head::Complete(head) => head,
        Head::Closed => return Ok(()),
        Head::TooLarge => {
            return respond(&mut conn, "431 Request Header Fields Too Large", "");
        }
        Head::Late => return respond(&mut conn, "408 Request Timeout", ""),
    };
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => match text(registry) {
            Ok(body) => respond(&mut conn, "200 OK", &body),
            Err(fmt::Error) => respond(&mut conn, "500 Internal Server Error", ""),
        },
        ("GET", _) => respond(&mut conn, "404 Not Found", "try /metrics\n"),
        _ => respond(&mut conn, "405 Method Not Allowed", ""),
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        prometheus_text::CONTENT_TYPE,
        body.len()
    )?;
    conn.flush()
}

/// The registry's metrics as Prometheus text.
fn text(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// A registry of one collector that writes its families on each scrape.
fn registry(
    families: impl Fn(&mut Families<'_>) -> fmt::Result + Send + Sync + 'static,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(OnScrape(families)));
    r
}

/// The crate's hook for counters kept elsewhere: called on each scrape.
struct OnScrape<F>(F);

impl<F> fmt::Debug for OnScrape<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnScrape")
    }
}

impl<F> Collector for OnScrape<F>
where
    F: Fn(&mut Families<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        (self.0)(&mut Families(encoder))
    }
}

/// Writes metric families. Names are the exported ones: the encoder adds
/// `_total` to a counter's name itself, so it is taken off here first.
struct Families<'a>(DescriptorEncoder<'a>);

impl Families<'_> {
    fn descriptor<'s>(
        &'s mut self,
        name: &'s str,
        kind: MetricType,
        help: &str,
    ) -> Result<MetricEncoder<'s>, fmt::Error> {
        let name = match kind {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.0.encode_descriptor(name, help, None, kind)
    }

    /// A family of one unlabelled sample.
    fn one<V>(&mut self, name: &str, kind: MetricType, help: &str, v: V) -> fmt::Result
    where
        V: EncodeGaugeValue + EncodeCounterValue + Copy,
    {
        sample(&mut self.descriptor(name, kind, help)?, kind, &v)
    }

    /// A family of labelled samples.
    fn labelled<L, V>(
        &mut self,
        name: &str,
        kind: MetricType,
        help: &str,
        samples: &[(L, V)],
    ) -> fmt::Result
    where
        L: EncodeLabelSet,
        V: EncodeGaugeValue + EncodeCounterValue,
    {
        let mut m = self.descriptor(name, kind, help)?;
        for (labels, v) in samples {
            sample(&mut m.encode_family(labels)?, kind, v)?;
        }
        Ok(())
    }
}

fn sample<V>(m: &mut MetricEncoder<'_>, kind: MetricType, v: &V) -> fmt::Result
where
    V: EncodeGaugeValue + EncodeCounterValue,
{
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, V, u64>(v, None),
        _ => m.encode_gauge(v),
    }
}

/// A node's answer to a stats request: its incarnation and named counters.
pub type NodeCounters = (u64, Vec<(String, u64)>);

/// One per-node family of the replicator: name suffix, type, help, value.
type NodeFamily<'a> = (&'a str, MetricType, &'a str, fn(&NodeStats) -> u64);

/// Serves the agent's replicator stats.
pub fn serve_agent(addr: SocketAddr, repl: Arc<Replicator>) -> std::io::Result<MetricsServer> {
    MetricsServer::spawn(addr, registry(move |f| agent_families(f, &repl.stats())))
}

#[allow(clippy::cast_precision_loss)] // seconds for display
fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// The replicator's stats.
fn agent_families(e: &mut Families<'_>, s: &ReplicatorStats) -> fmt::Result {
    e.one(
        "sessio_replicator_dirty_sessions",
        Gauge,
        "Sessions whose current version is not yet acknowledged by R nodes.",
        s.dirty,
    )?;
    e.one(
        "sessio_replicator_oldest_unacked_seconds",
        Gauge,
        "How long the oldest update not yet acknowledged by R nodes has waited.",
        secs(s.oldest_unacked_us),
    )?;
    e.one(
        "sessio_replicator_bytes_sent_total",
        Counter,
        "Bytes of batches sent, all nodes.",
        s.bytes_sent,
    )?;
    e.one(
        "sessio_replicator_bytes_per_second",
        Gauge,
        "Bytes sent per second over the last full second.",
        s.bytes_per_sec,
    )?;
    e.one(
        "sessio_replicator_ticks_total",
        Counter,
        "Dispatcher ticks run.",
        s.ticks,
    )?;
    e.one(
        "sessio_replicator_lag_samples_total",
        Counter,
        "Sessions that reached R acknowledgements (lag samples).",
        s.lag_samples,
    )?;
    e.labelled(
        "sessio_replicator_lag_seconds",
        Gauge,
        "Update-to-acknowledgement lag by R nodes (from an HDR histogram, to 2 significant digits).",
        &[
            ([("quantile", "0.5")], secs(s.lag_p50_us)),
            ([("quantile", "0.99")], secs(s.lag_p99_us)),
            ([("quantile", "1")], secs(s.lag_max_us)),
        ],
    )?;
    lag_histogram(e, s)?;
    let families: [NodeFamily<'_>; 12] = [
        ("up", Gauge, "Whether the link to the node is up.", |n| {
            u64::from(n.up)
        }),
        (
            "pending_sessions",
            Gauge,
            "Sessions waiting to be sent to the node.",
            |n| n.pending,
        ),
        (
            "in_flight_entries",
            Gauge,
            "Entries sent, not yet acknowledged.",
            |n| n.in_flight,
        ),
        (
            "owed_sessions",
            Gauge,
            "Sessions owed to the node while it is down.",
            |n| n.owed,
        ),
        ("applied_total", Counter, "Entries the node applied.", |n| {
            n.applied
        }),
        (
            "need_full_total",
            Counter,
            "Entries the node answered NeedFull.",
            |n| n.need_full,
        ),
        (
            "fenced_total",
            Counter,
            "Entries the node fenced (a newer owner holds them).",
            |n| n.fenced,
        ),
        ("refused_total", Counter, "Entries the node refused.", |n| {
            n.refused
        }),
        (
            "evicted_total",
            Counter,
            "Local copies evicted because the node said another host took them over.",
            |n| n.evicted,
        ),
        (
            "bytes_sent_total",
            Counter,
            "Bytes of batches sent to the node.",
            |n| n.bytes_sent,
        ),
        (
            "connects_total",
            Counter,
            "Successful handshakes with the node.",
            |n| n.connects,
        ),
        (
            "new_incarnations_total",
            Counter,
            "Handshakes that showed a restarted node.",
            |n| n.new_incarnations,
        ),
    ];
    for (name, kind, help, f) in families {
        let samples: Vec<_> = s.nodes.iter().map(|n| ([("node", n.id)], f(n))).collect();
        e.labelled(
            &format!("sessio_replicator_node_{name}"),
            kind,
            help,
            &samples,
        )?;
    }
    if let Some(a) = &s.arena {
        arena_families(e, a)?;
    }
    Ok(())
}

/// The lag histogram, cumulative as Prometheus wants it, so quantiles over
/// any window can be computed from two scrapes. The last bucket is the
/// overflow: it counts only towards `+Inf`.
#[allow(clippy::cast_precision_loss)] // seconds for display
fn lag_histogram(e: &mut Families<'_>, s: &ReplicatorStats) -> fmt::Result {
    // The encoder sums bucket counts itself: give each bucket its own, the
    // samples below 2^b µs and not below 2^(b-1).
    let below = |b: usize| {
        if b == 0 {
            0
        } else {
            s.lag.count_at_most_us((1u64 << b) - 1)
        }
    };
    let buckets: Vec<(f64, u64)> = (0..LAG_BUCKETS - 1)
        .map(|b| (secs(1u64 << b), below(b) - below(b.saturating_sub(1))))
        .collect();
    e.descriptor(
        "sessio_replicator_lag_histogram_seconds",
        MetricType::Histogram,
        "Update-to-acknowledgement lag by R nodes, in power-of-two buckets of microseconds.",
    )?
    .encode_histogram::<NoLabelSet>(secs(s.lag.sum_us()), s.lag.count(), &buckets, None)
}

/// The host arena's counters, as the agent last read them.
fn arena_families(e: &mut Families<'_>, a: &sessio_engine::ArenaStats) -> fmt::Result {
    let rows: [(&str, MetricType, &str, u64); 11] = [
        (
            "live_sessions",
            Gauge,
            "Live sessions in the arena.",
            a.live,
        ),
        (
            "capacity_sessions",
            Gauge,
            "Session capacity of the arena.",
            a.capacity,
        ),
        (
            "heap_chunks_touched",
            Gauge,
            "Heap chunks ever handed to size classes (high-water mark, not chunks in use).",
            a.chunks_touched,
        ),
        ("heap_chunks", Gauge, "Heap chunks in all.", a.chunks),
        (
            "handles",
            Gauge,
            "Arena handles open now, all processes.",
            u64::from(a.handles),
        ),
        (
            "collections_total",
            Counter,
            "Online collections run.",
            a.collections,
        ),
        (
            "leaked_blocks_returned_total",
            Counter,
            "Heap blocks lost by killed processes that collections found and gave back.",
            a.leaked_blocks_returned,
        ),
        (
            "chunks_returned_total",
            Counter,
            "Wholly free heap chunks collections gave back to the pool.",
            a.chunks_returned,
        ),
        (
            "evicted_total",
            Counter,
            "Copies evicted because another host took their session over.",
            a.evicted_total,
        ),
        (
            "removals_dropped_total",
            Counter,
            "Removals the replicator never saw (it was stalled while their index slot was reused).",
            a.removals_dropped,
        ),
        (
            "collect_suspects",
            Gauge,
            "Processes found dead inside an update since the last collection.",
            a.suspects,
        ),
    ];
    for (name, kind, help, v) in rows {
        e.one(&format!("sessio_arena_{name}"), kind, help, v)?;
    }
    e.one(
        "sessio_arena_last_collect_pause_seconds",
        Gauge,
        "How long the last collection held updates (reads never wait).",
        secs(a.last_collect_pause_us),
    )
}

/// Serves the counters of the node `node_id` listening on `node`.
pub fn serve_node(
    addr: SocketAddr,
    node: SocketAddr,
    node_id: u16,
    secret: Secret,
) -> std::io::Result<MetricsServer> {
    MetricsServer::spawn(
        addr,
        registry(move |f| {
            let stats = if IoUring::available() {
                node_stats::<IoUring>(node, node_id, &secret)
            } else {
                node_stats::<Epoll>(node, node_id, &secret)
            };
            node_families(f, node_id, stats.as_ref().map_err(String::as_str))
        }),
    )
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

/// A node's counters; `Err` writes `up 0` only.
fn node_families(
    e: &mut Families<'_>,
    node_id: u16,
    stats: Result<&NodeCounters, &str>,
) -> fmt::Result {
    let node = ("node", node_id);
    e.labelled(
        "sessio_node_up",
        Gauge,
        "Whether the node answered this scrape's stats request.",
        &[([node], u64::from(stats.is_ok()))],
    )?;
    let Ok((incarnation, counters)) = stats else {
        return Ok(());
    };
    e.labelled(
        "sessio_node_info",
        Gauge,
        "The node's current incarnation (random per start).",
        &[(
            ([node], [("incarnation", format!("{incarnation:016x}"))]),
            1u64,
        )],
    )?;
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
        // The store's sizes and the open connections are gauges;
        // everything else only grows.
        let (family, kind) = if matches!(
            name.as_str(),
            "sessions" | "bytes" | "net_open" | "net_handshaking"
        ) {
            (format!("sessio_node_{name}"), Gauge)
        } else {
            (format!("sessio_node_{name}_total"), Counter)
        };
        e.labelled(
            &family,
            kind,
            &format!("The node's {name} counter."),
            &[([node], *value)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts `t` holds every one of `lines`.
    fn has_lines(t: &str, lines: &[&str]) {
        for line in lines {
            assert!(t.contains(line), "{line} in {t}");
        }
    }

    /// The agent's text for `s`, checked to hold every one of `lines`.
    fn agent_text_with(s: &ReplicatorStats, lines: &[&str]) -> String {
        let t = render_agent(s);
        has_lines(&t, lines);
        t
    }

    fn render_agent(s: &ReplicatorStats) -> String {
        let s = s.clone();
        text(&registry(move |f| agent_families(f, &s))).unwrap()
    }

    fn render_node(node_id: u16, stats: Result<&NodeCounters, &str>) -> String {
        let stats = stats.cloned().map_err(str::to_string);
        text(&registry(move |f| {
            node_families(f, node_id, stats.as_ref().map_err(String::as_str))
        }))
        .unwrap()
    }

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
            oldest_unacked_us: 2_500_000,
            lag_p99_us: 1500,
            lag: {
                let mut lag = sessio_remote::replicator::Lag::default();
                for us in [1, 600, 700, 7_200_000_000] {
                    lag.record(std::time::Duration::from_micros(us));
                }
                lag
            },
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
        let t = agent_text_with(
            &s,
            &[
                "sessio_replicator_dirty_sessions 4\n",
                "sessio_replicator_oldest_unacked_seconds 2.5\n",
                "sessio_replicator_lag_seconds{quantile=\"0.99\"} 0.0015\n",
            ],
        );
        has_lines(
            &t,
            &[
                "# TYPE sessio_replicator_lag_histogram_seconds histogram\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"1e-06\"} 0\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"2e-06\"} 1\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"0.000512\"} 1\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"0.001024\"} 3\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"1073.741824\"} 3\n",
                "sessio_replicator_lag_histogram_seconds_bucket{le=\"+Inf\"} 4\n",
                // An hour (the histogram's ceiling) plus 1.3 ms, to its two
                // significant digits.
                "sessio_replicator_lag_histogram_seconds_sum 359",
                "sessio_replicator_lag_histogram_seconds_count 4\n",
            ],
        );
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
                index_slots: 256,
                created_total: 12,
                expired_total: 2,
                removals_dropped: 0,
                evicted_total: 0,
                chunks_touched: 3,
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
        agent_text_with(
            &s,
            &[
                "sessio_arena_live_sessions 10\n",
                "# TYPE sessio_arena_collections_total counter\nsessio_arena_collections_total 5\n",
                "sessio_arena_leaked_blocks_returned_total 7\n",
                "sessio_arena_chunks_returned_total 2\n",
                "# TYPE sessio_arena_collect_suspects gauge\nsessio_arena_collect_suspects 1\n",
                "sessio_arena_last_collect_pause_seconds 0.0015\n",
            ],
        );
    }

    /// A server whose registry has one sample.
    fn test_server() -> MetricsServer {
        let r = registry(|f| f.one("sessio_test_up", Gauge, "Test.", 1u64));
        MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), r).unwrap()
    }

    /// `GET path`: the whole answer, and how long it took.
    fn get(addr: SocketAddr, path: &str) -> (String, Duration) {
        let t = Instant::now();
        let out = try_get(addr, path).unwrap();
        (out, t.elapsed())
    }

    fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_slow_client_is_cut_off_and_delays_no_other() {
        let server = test_server();
        let addr = server.addr();
        let started = Instant::now();
        // One byte every 300 ms: each read finishes well within a read
        // timeout, only the whole-request deadline stops it.
        let slow = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut got = Vec::new();
            for b in b"GET /metrics HTTP/1.1\r\nHost: a-slow-client\r\n\r\n" {
                // Once the server closed, a write may fail; the read tells.
                let _ = c.write_all(&[*b]);
                let mut buf = [0u8; 256];
                match c.read(&mut buf) {
                    Ok(0) => return Some((started.elapsed(), got)),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    // Reset: closed with our last byte unread.
                    Err(_) => return Some((started.elapsed(), got)),
                }
            }
            None
        });
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            let (answer, took) = get(addr, "/metrics");
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.ends_with("\nsessio_test_up 1\n"), "{answer}");
            assert!(took < Duration::from_secs(1), "a scrape took {took:?}");
        }
        let (cut, got) = slow
            .join()
            .unwrap()
            .expect("the slow client was never cut off");
        let deadline = Duration::from_millis(REQUEST_DEADLINE_MS);
        assert!(
            cut >= deadline && cut < deadline + Duration::from_millis(1500),
            "cut off after {cut:?}"
        );
        let got = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 408 "), "{got}");
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_and_the_rest_answered() {
        let server = test_server();
        let addr = server.addr();
        let idle: Vec<TcpStream> = (0..CONNECTIONS_MAX)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Accepted in order: wait until all of them hold their slot.
        std::thread::sleep(Duration::from_millis(4 * ACCEPT_POLL_MS));
        let t = Instant::now();
        let refused = try_get(addr, "/metrics");
        let took = t.elapsed();
        assert!(
            refused.as_ref().is_err() || refused.as_ref().is_ok_and(String::is_empty),
            "{refused:?}"
        );
        assert!(took < Duration::from_secs(1), "a refusal took {took:?}");
        // The idle ones are cut at the deadline and free their slots.
        std::thread::sleep(Duration::from_millis(REQUEST_DEADLINE_MS + 500));
        let (answer, _) = get(addr, "/metrics");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let (answer, _) = get(addr, "/other");
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        drop(idle);
    }
}

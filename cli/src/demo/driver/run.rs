//! One run of the demo: clients sending requests through the hosts'
//! workers, failures injected on the schedule, answers checked against
//! each client's model, and the progress shown meanwhile.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sessio_engine::{Arena, Sid};

use super::*;
use crate::demo::model::Expected;
use crate::demo::procs::NodeProc;
use crate::demo::protocol::{Answer, decode_attrs, digest};
use crate::signals::stop_requested;

/// The bar over the load phase, `load_s` long, on stderr; it draws
/// nothing when stderr is not a terminal.
#[allow(clippy::cast_sign_loss)]
fn progress_bar(load_s: f64) -> ProgressBar {
    let bar =
        ProgressBar::with_draw_target(Some((load_s * 1000.0) as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("demo [{prefix:>22}] {bar:20} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// One run's moving state.
pub(super) struct Run<'a> {
    d: &'a mut Demo,
    plan: Schedule,
    start: Instant,
    seq: u64,
    pending: HashMap<u64, Pending>,
    inflight: Vec<usize>,
    worker_dead: Vec<bool>,
    host_dead: Vec<bool>,
    host_kill_at: Option<Instant>,
    orphans_settled: bool,
    ready: VecDeque<usize>,
    parked: Vec<usize>,
    sent: u64,
    tally: Tally,
    repl: Vec<ReplStats>,
    stats_asked: Vec<bool>,
    events: Vec<String>,
    phase: &'static str,
    progress_at: Instant,
    progress_requests: u64,
    ops_per_s: u64,
    /// Progress on a terminal; its position is the load time done, in ms.
    bar: ProgressBar,
}

impl<'a> Run<'a> {
    pub(super) fn new(d: &'a mut Demo, plan: Schedule) -> Run<'a> {
        let workers = d.workers.len();
        let ready = (0..d.clients.len()).collect();
        Run {
            d,
            plan,
            start: Instant::now(),
            seq: 0,
            pending: HashMap::new(),
            inflight: vec![0; workers],
            worker_dead: vec![false; workers],
            host_dead: vec![false; HOSTS],
            host_kill_at: None,
            orphans_settled: false,
            ready,
            parked: Vec::new(),
            sent: 0,
            tally: Tally::default(),
            repl: vec![ReplStats::default(); HOSTS],
            stats_asked: vec![false; HOSTS],
            events: Vec::new(),
            phase: "load",
            progress_at: Instant::now(),
            progress_requests: 0,
            ops_per_s: 0,
            bar: progress_bar(plan.end),
        }
    }

    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn event(&mut self, phase: &'static str) {
        self.phase = phase;
        let t = self.t();
        self.events.push(format!("{phase} at {t:.1}s"));
        self.progress(true);
    }

    pub(super) fn go(mut self, wipe_bank: bool) -> Result<Report, String> {
        let mut step = 0;
        let mut stats_at = Instant::now();
        while self.t() < self.plan.end {
            if stop_requested() {
                return Err("interrupted".into());
            }
            // Failures land right after a burst of requests went out, so
            // some are in flight when a process dies.
            self.pump();
            let t = self.t();
            match step {
                0 if t >= self.plan.node_kill => {
                    self.d.nodes[NODES as usize - 1].proc.kill9();
                    self.event("node 3 killed");
                    step += 1;
                }
                1 if t >= self.plan.node_restart => {
                    let (id, addr) = {
                        let n = &self.d.nodes[NODES as usize - 1];
                        (n.id, n.addr)
                    };
                    let node = NodeProc::spawn(&self.d.exe, id, addr, &self.d.secret.file)?;
                    self.d.nodes[NODES as usize - 1] = node;
                    self.event("node 3 restarted empty");
                    step += 1;
                }
                2 if t >= self.plan.bank_stop => {
                    for n in &self.d.nodes {
                        n.proc.signal(libc::SIGSTOP);
                    }
                    self.event("bank stopped");
                    step += 1;
                }
                3 if t >= self.plan.bank_resume => {
                    for n in &self.d.nodes {
                        n.proc.signal(libc::SIGCONT);
                    }
                    self.event("bank back");
                    step += 1;
                }
                4 if t >= self.plan.host_kill => {
                    self.kill_host(0);
                    self.event("host 1 killed");
                    if wipe_bank {
                        self.d.wipe_bank()?;
                        self.event("bank wiped (fault injection)");
                    }
                    step += 1;
                }
                _ => {}
            }
            if stats_at.elapsed() >= Duration::from_millis(STATS_INTERVAL_MS) {
                stats_at = Instant::now();
                self.ask_stats();
            }
            self.receive(Duration::from_millis(2))?;
            self.progress(false);
        }
        if step < 5 {
            return Err(format!("schedule cut short at step {step}"));
        }
        self.event("draining");
        self.drain(Duration::from_millis(DRAIN_TIMEOUT_MS))?;
        self.event("checking");
        self.check()?;
        self.bar.finish();
        Ok(self.report())
    }

    /// Sends requests while the rate and the windows allow.
    fn pump(&mut self) {
        #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
        let allowed = (self.d.rate as f64 * self.t()) as u64;
        let now = Instant::now();
        let mut tries = self.ready.len();
        let mut touched = [false; HOSTS * WORKERS_PER_HOST];
        while self.sent < allowed && tries > 0 {
            tries -= 1;
            let Some(ci) = self.ready.pop_front() else {
                break;
            };
            let c = &self.d.clients[ci];
            if self.host_dead[c.host] {
                self.parked.push(ci);
                continue;
            }
            let w = c.host * WORKERS_PER_HOST + c.worker;
            if c.retry_at.is_some_and(|r| r > now) || self.inflight[w] >= WINDOW_PER_WORKER {
                self.ready.push_back(ci);
                continue;
            }
            let kind = self.d.clients[ci].next_kind();
            self.send(ci, kind);
            touched[w] = true;
        }
        for (w, t) in touched.iter().enumerate() {
            if *t {
                self.d.workers[w].flush();
            }
        }
    }

    fn send(&mut self, ci: usize, kind: Kind) {
        self.seq += 1;
        let seq = self.seq;
        let c = &mut self.d.clients[ci];
        let w = c.host * WORKERS_PER_HOST + c.worker;
        let sid = c.sid.clone().unwrap_or_default();
        let line = match kind {
            Kind::New => format!("{seq} new {}", c.user),
            Kind::Update(op) => {
                let (cmd, args) = op.request();
                format!("{seq} {cmd} {sid} {args}")
            }
            Kind::View => format!("{seq} view {sid}"),
            Kind::Dump => format!("{seq} dump {sid}"),
        };
        c.inflight = Some(InFlight {
            seq,
            kind,
            sent: Instant::now(),
        });
        c.retry_at = None;
        self.pending.insert(seq, Pending::Client(ci));
        self.inflight[w] += 1;
        self.sent += 1;
        self.d.workers[w].send(&line);
    }

    fn ask_stats(&mut self) {
        for h in 0..HOSTS {
            if self.host_dead[h] || self.stats_asked[h] {
                continue;
            }
            self.seq += 1;
            let w = h * WORKERS_PER_HOST;
            self.pending.insert(self.seq, Pending::Stats(h));
            self.stats_asked[h] = true;
            let line = format!("{} stats", self.seq);
            self.d.workers[w].send(&line);
            self.d.workers[w].flush();
        }
    }

    /// Handles answers for up to `wait`.
    fn receive(&mut self, wait: Duration) -> Result<(), String> {
        let mut first = true;
        loop {
            let msg = if first {
                first = false;
                match self.d.rx.recv_timeout(wait) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => return Ok(()),
                    Err(RecvTimeoutError::Disconnected) => return Err("workers gone".into()),
                }
            } else {
                match self.d.rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            };
            match msg {
                (w, Some(line)) => self.answer(w, &line)?,
                (w, None) => self.worker_died(w)?,
            }
        }
    }

    fn answer(&mut self, w: usize, line: &str) -> Result<(), String> {
        let a = Answer::parse(line).ok_or_else(|| format!("worker {w} answered {line:?}"))?;
        let Some(p) = self.pending.remove(&a.seq) else {
            return Ok(());
        };
        let ci = match p {
            Pending::Stats(h) => {
                self.stats_asked[h] = false;
                if a.status == "stats" {
                    self.repl[h] = ReplStats {
                        dirty: a.num("dirty"),
                        lag_p50_us: a.num("lag_p50_us"),
                        lag_p99_us: a.num("lag_p99_us"),
                        lag_samples: a.num("lag_samples"),
                        lag_max_us: a.num("lag_max_us"),
                        nodes_up: a.num("nodes_up"),
                    };
                }
                return Ok(());
            }
            Pending::Client(ci) => ci,
        };
        self.inflight[w] -= 1;
        let Some(f) = self.d.clients[ci].inflight.take() else {
            return Ok(());
        };
        debug_assert_eq!(f.seq, a.seq);
        let now = Instant::now();
        match a.status.as_str() {
            "ok" => {
                self.tally.requests += 1;
                self.tally.read_ns.record(a.num("read_ns"));
                if let Some(state) = a.get("fetched") {
                    self.fetched(ci, a.num("fetched_v"), state, a.num("fetch_us"));
                }
                self.done(ci, f.kind, &a, f.sent);
            }
            "gone" => {
                self.tally.requests += 1;
                self.gone(ci);
            }
            _ => {
                self.tally.errors += 1;
                self.tally.last_error = a.get("why").unwrap_or("?").to_string();
                self.d.clients[ci].retry_at = Some(now + Duration::from_millis(RETRY_MS));
            }
        }
        self.ready.push_back(ci);
        Ok(())
    }

    /// A client's request, sent at `sent`, succeeded: fold it into its
    /// expected state.
    fn done(&mut self, ci: usize, kind: Kind, a: &Answer, sent: Instant) {
        let v = a.num("v");
        let c = &mut self.d.clients[ci];
        if let Kind::New = kind {
            c.sid = a.get("sid").map(str::to_string);
            c.exp = Expected::new(c.host == 0 && !self.host_dead[0]);
            c.created_at = sent;
        }
        // What the request read, before its own update, must be exactly
        // what the client expects: read-your-writes on every request.
        let want = c.exp.now.attrs(&c.user);
        let want = format!(
            "{:x}",
            digest(want.iter().map(|(k, v)| (k.as_str(), &v[..])))
        );
        if a.get("d") != Some(want.as_str()) {
            let why = format!(
                "{}: a request read a state that differs from the client's at version {}",
                c.user, c.exp.version
            );
            self.tally.mismatch(c, why);
        }
        match kind {
            Kind::New => {
                if v != 1 {
                    let why = format!("{}: new session at version {v}", c.user);
                    self.tally.mismatch(c, why);
                }
            }
            Kind::Update(op) => {
                self.tally.updates += 1;
                if v != c.exp.version + 1 {
                    let why = format!(
                        "{}: update produced version {v}, expected {}",
                        c.user,
                        c.exp.version + 1
                    );
                    c.exp.version = v - 1;
                    self.tally.mismatch(c, why);
                }
                c.exp.push(v, op, sent);
            }
            Kind::View => {
                if v != c.exp.version {
                    let why = format!("{}: read version {v}, expected {}", c.user, c.exp.version);
                    c.exp.version = v;
                    self.tally.mismatch(c, why);
                }
            }
            Kind::Dump => {
                c.checked = true;
                let want = c.exp.now.attrs(&c.user);
                let got = a.get("attrs").and_then(decode_attrs);
                if v != c.exp.version || got.as_ref() != Some(&want) {
                    let why = format!(
                        "{}: holds version {v} {got:?}, expected version {} {want:?}",
                        c.user, c.exp.version
                    );
                    self.tally.mismatch(c, why);
                }
            }
        }
    }

    /// A host-2 worker fetched the session from the bank (failover): account
    /// for what the bank returned against what the client saw.
    fn fetched(&mut self, ci: usize, f: u64, state: &str, fetch_us: u64) {
        self.tally.fetch_us.record(fetch_us);
        let kill_at = self.host_kill_at.unwrap_or_else(Instant::now);
        let now = Instant::now();
        let c = &mut self.d.clients[ci];
        let Some(o) = c.orphan.take() else {
            self.tally.unexpected_fetches += 1;
            let why = format!("{}: fetched from the bank but its host is alive", c.user);
            self.tally.mismatch(c, why);
            return;
        };
        if f < o.bank_acked {
            self.tally.lost_acked += o.bank_acked - f;
        }
        if f > o.local_version {
            match o.maybe {
                Some(op) if f == o.local_version + 1 => {
                    // Applied and shipped; only the answer was lost.
                    c.exp.push(f, op, now);
                    self.tally.inflight_recovered += 1;
                }
                _ => {
                    let why = format!(
                        "{}: bank returned version {f}, client saw only {}",
                        c.user, o.local_version
                    );
                    self.tally.mismatch(c, why);
                }
            }
        }
        let cut = c.exp.cut_to(f);
        let unacked: Vec<_> = cut.iter().filter(|l| l.version > o.bank_acked).collect();
        if !unacked.is_empty() {
            self.tally.unacked_lost += unacked.len() as u64;
            self.tally.unacked_sessions += 1;
            let oldest = unacked[0].at;
            self.tally.unacked_window = self
                .tally
                .unacked_window
                .max(kill_at.saturating_duration_since(oldest));
        }
        let want = c.exp.now.attrs(&c.user);
        if decode_attrs(state).as_ref() != Some(&want) {
            let why = format!(
                "{}: bank copy at version {f} is {state}, expected {want:?}",
                c.user
            );
            self.tally.mismatch(c, why);
        }
    }

    /// No replica holds the session: it was created on host 1 and never
    /// acknowledged by the bank (else it is a loss). The client logs in
    /// again.
    fn gone(&mut self, ci: usize) {
        let kill_at = self.host_kill_at.unwrap_or_else(Instant::now);
        let c = &mut self.d.clients[ci];
        let Some(o) = c.orphan.take() else {
            let why = format!("{}: session vanished from a live host", c.user);
            self.tally.mismatch(c, why);
            return;
        };
        self.tally.gone += 1;
        // Versions 2.. are logged updates; version 1 is the create itself.
        let cut = c.exp.cut_to(0);
        let mut unacked = cut.iter().filter(|l| l.version > o.bank_acked).count() as u64;
        let mut oldest = cut.iter().find(|l| l.version > o.bank_acked).map(|l| l.at);
        if o.bank_acked == 0 {
            unacked += 1;
            oldest = Some(c.created_at);
        }
        self.tally.lost_acked += o.bank_acked;
        if let Some(oldest) = oldest {
            self.tally.unacked_lost += unacked;
            self.tally.unacked_sessions += 1;
            self.tally.unacked_window = self
                .tally
                .unacked_window
                .max(kill_at.saturating_duration_since(oldest));
        }
        c.sid = None;
        c.exp = Expected::new(false);
    }

    fn kill_host(&mut self, h: usize) {
        self.host_dead[h] = true;
        for w in h * WORKERS_PER_HOST..(h + 1) * WORKERS_PER_HOST {
            self.d.workers[w].kill9();
        }
        self.host_kill_at = Some(Instant::now());
    }

    /// A worker's stdout closed. Expected for host 1 after its kill: once
    /// both its workers' answers are all in, its clients move to host 2.
    fn worker_died(&mut self, w: usize) -> Result<(), String> {
        let h = w / WORKERS_PER_HOST;
        if stop_requested() {
            return Err("interrupted".into());
        }
        if !self.host_dead[h] {
            return Err(format!("worker {w} of host {} died", h + 1));
        }
        self.worker_dead[w] = true;
        if (h * WORKERS_PER_HOST..(h + 1) * WORKERS_PER_HOST).all(|w| self.worker_dead[w]) {
            self.settle_orphans(h)?;
        }
        Ok(())
    }

    /// Reads, from the dead host's arena, what the bank had acknowledged,
    /// and moves the host's clients to the next host.
    fn settle_orphans(&mut self, h: usize) -> Result<(), String> {
        if self.orphans_settled {
            return Ok(());
        }
        self.orphans_settled = true;
        let loc = &self.d.arenas[h].0;
        // Every process of the host is dead and reaped: this handle opens
        // the arena alone (and runs its recovery).
        let arena =
            Arena::open_existing(loc).map_err(|e| format!("opening host 1's arena: {e}"))?;
        let to = (h + 1) % HOSTS;
        for (ci, c) in self.d.clients.iter_mut().enumerate() {
            if c.host != h {
                continue;
            }
            let maybe = match c.inflight.take() {
                Some(f) => {
                    self.pending.remove(&f.seq);
                    match f.kind {
                        Kind::Update(op) => Some(op),
                        _ => None,
                    }
                }
                None => None,
            };
            if let Some(sid) = c.sid.as_ref().and_then(|s| s.parse::<Sid>().ok()) {
                let bank_acked = match arena.acked(sid) {
                    // Held by R = 2 nodes: the lower of the two acks.
                    Ok([(n0, v0), (n1, v1)]) if n0 != 0 && n1 != 0 => v0.min(v1),
                    _ => 0,
                };
                self.tally.bank_acked_at_kill += bank_acked;
                self.tally.local_at_kill += c.exp.version;
                c.orphan = Some(Orphan {
                    bank_acked,
                    local_version: c.exp.version,
                    maybe,
                });
            }
            c.host = to;
            c.retry_at = None;
            if !self.parked.contains(&ci) && !self.ready.contains(&ci) {
                self.ready.push_back(ci);
            }
        }
        for w in h * WORKERS_PER_HOST..(h + 1) * WORKERS_PER_HOST {
            self.inflight[w] = 0;
        }
        self.ready.extend(self.parked.drain(..));
        drop(arena);
        let _ = Arena::remove(loc);
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.d
            .clients
            .iter()
            .filter(|c| c.inflight.is_some())
            .count()
    }

    /// Lets every request in flight finish.
    fn drain(&mut self, limit: Duration) -> Result<(), String> {
        let t = Instant::now();
        while (self.outstanding() > 0 || !self.orphans_settled) && t.elapsed() < limit {
            if stop_requested() {
                return Err("interrupted".into());
            }
            self.receive(Duration::from_millis(5))?;
        }
        if self.outstanding() > 0 {
            return Err(format!("{} requests never answered", self.outstanding()));
        }
        Ok(())
    }

    /// Reads every session back from the host that serves its client and
    /// compares it with the client's expected state.
    fn check(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let mut stats_asked = false;
        loop {
            if stop_requested() {
                return Err("interrupted".into());
            }
            let todo: Vec<usize> = (0..self.d.clients.len())
                .filter(|&i| {
                    let c = &self.d.clients[i];
                    !c.checked && c.inflight.is_none()
                })
                .collect();
            if todo.is_empty() && self.outstanding() == 0 {
                break;
            }
            if t.elapsed() > Duration::from_millis(CHECK_TIMEOUT_MS) {
                return Err(format!(
                    "{} sessions could not be read back (last error: {})",
                    todo.len(),
                    self.tally.last_error
                ));
            }
            let now = Instant::now();
            let mut touched = vec![false; self.d.workers.len()];
            for ci in todo {
                let c = &self.d.clients[ci];
                if c.retry_at.is_some_and(|r| r > now) {
                    continue;
                }
                let w = c.host * WORKERS_PER_HOST + c.worker;
                if self.inflight[w] >= WINDOW_PER_WORKER {
                    continue;
                }
                // A client that never got a session logs in first.
                let kind = if c.sid.is_none() {
                    Kind::New
                } else {
                    Kind::Dump
                };
                self.send(ci, kind);
                touched[w] = true;
            }
            for (w, t) in touched.iter().enumerate() {
                if *t {
                    self.d.workers[w].flush();
                }
            }
            if !stats_asked {
                stats_asked = true;
                self.ask_stats();
            }
            self.receive(Duration::from_millis(5))?;
        }
        // The final replicator counters of the surviving host.
        let t = Instant::now();
        while self.stats_asked.iter().any(|a| *a) && t.elapsed() < Duration::from_secs(2) {
            self.receive(Duration::from_millis(5))?;
        }
        Ok(())
    }

    /// The live counters on stderr: on a terminal, the bar's message,
    /// redrawn every [`PROGRESS_TICK_MS`]; elsewhere (the bar hides itself
    /// there) a line per event and every [`PROGRESS_LOG_MS`], for logs.
    fn progress(&mut self, force: bool) {
        let logging = self.bar.is_hidden();
        let every = if logging {
            PROGRESS_LOG_MS
        } else {
            PROGRESS_TICK_MS
        };
        let since = self.progress_at.elapsed();
        if !force && since < Duration::from_millis(every) {
            return;
        }
        if since >= Duration::from_millis(PROGRESS_TICK_MS) {
            let done = self.tally.requests - self.progress_requests;
            #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
            {
                self.ops_per_s = (done as f64 / since.as_secs_f64()) as u64;
            }
            self.progress_requests = self.tally.requests;
            self.progress_at = Instant::now();
        }
        let lag = self.repl.iter().map(|r| r.lag_p99_us).max().unwrap_or(0);
        let dirty: u64 = self
            .repl
            .iter()
            .zip(&self.host_dead)
            .filter(|(_, d)| !**d)
            .map(|(r, _)| r.dirty)
            .sum();
        let counters = format!(
            "{:5.1}s  {:>6} req/s  requests {:>8}  failovers {:>4}  dirty {:>5}  lag p99 {:>7} us",
            self.t(),
            self.ops_per_s,
            self.tally.requests,
            self.tally.fetch_us.len(),
            dirty,
            lag
        );
        if logging {
            eprintln!("demo [{:>22}] {counters}", self.phase);
        } else {
            #[allow(clippy::cast_sign_loss)]
            self.bar.set_position((self.t() * 1000.0) as u64);
            self.bar.set_prefix(self.phase);
            self.bar.set_message(counters);
        }
    }

    fn report(self) -> Report {
        let secs = self.plan.end;
        #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
        let ops_per_s = (self.tally.requests as f64 / secs) as u64;
        let read_p50 = self.tally.read_ns.quantile(0.5);
        let read_p99 = self.tally.read_ns.quantile(0.99);
        let fetch_p50 = self.tally.fetch_us.quantile(0.5);
        let fetch_p99 = self.tally.fetch_us.quantile(0.99);
        let lag_p50 = self.repl.iter().map(|r| r.lag_p50_us).max().unwrap_or(0);
        let lag_p99 = self.repl.iter().map(|r| r.lag_p99_us).max().unwrap_or(0);
        let sessions = self.d.clients.len();
        let checked = self.d.clients.iter().filter(|c| c.checked).count();
        let moved = self.tally.fetch_us.len() + self.tally.gone;
        let t = &self.tally;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "demo: {NODES} replica nodes (R=2), {HOSTS} hosts x {WORKERS_PER_HOST} worker processes sharing one arena each, {sessions} clients, {secs:.0} s of load"
        );
        let _ = writeln!(text, "demo: events: {}", self.events.join(", "));
        let _ = writeln!(
            text,
            "demo: {} requests ({ops_per_s}/s), {} updates, {} retried errors; local read p50 {read_p50} ns, p99 {read_p99} ns",
            t.requests, t.updates, t.errors
        );
        for (h, r) in self.repl.iter().enumerate() {
            let _ = writeln!(
                text,
                "demo: host {} replication lag (update -> acked by 2 nodes) p50 {} us, p99 {} us, max {} us over {} sessions shipped{}",
                h + 1,
                r.lag_p50_us,
                r.lag_p99_us,
                r.lag_max_us,
                r.lag_samples,
                if self.host_dead[h] {
                    " (last seen before its death)".to_string()
                } else {
                    format!(", {} nodes up, {} dirty at the end", r.nodes_up, r.dirty)
                }
            );
        }
        let _ = writeln!(
            text,
            "demo: failover: {moved} sessions of host 1 moved to host 2: {} fetched from the bank (p50 {fetch_p50} us, p99 {fetch_p99} us), {} not found in the bank",
            t.fetch_us.len(),
            t.gone
        );
        let _ = writeln!(
            text,
            "demo: when host 1 died its clients had seen {} session versions; its arena showed {} of them acked by 2 nodes",
            t.local_at_kill, t.bank_acked_at_kill
        );
        let _ = writeln!(
            text,
            "demo: loss: {} updates acked by the bank and lost; {} updates in {} sessions not yet acked when host 1 died (window {} us before its death); {} in-flight updates recovered from the bank",
            t.lost_acked,
            t.unacked_lost,
            t.unacked_sessions,
            t.unacked_window.as_micros(),
            t.inflight_recovered
        );
        let _ = writeln!(
            text,
            "demo: check: {checked} of {sessions} sessions read back and compared with their clients' carts and histories: {} mismatches",
            t.mismatches
        );
        for ex in &t.mismatch_examples {
            let _ = writeln!(text, "demo:   mismatch: {ex}");
        }
        let failure = if t.lost_acked > 0 {
            Some(format!("{} acknowledged updates lost", t.lost_acked))
        } else if t.mismatches > 0 {
            Some(format!(
                "{} sessions differ from their clients",
                t.mismatches
            ))
        } else if checked != sessions {
            Some(format!("only {checked} of {sessions} sessions checked"))
        } else if moved == 0 {
            Some("no session failed over".to_string())
        } else {
            None
        };
        let figures = format!(
            "sessions={sessions} checked={checked} mismatched_sessions={} requests={} updates={} ops_per_s={ops_per_s} read_p50_ns={read_p50} read_p99_ns={read_p99} lag_p50_us={lag_p50} lag_p99_us={lag_p99} failovers={} failover_p50_us={fetch_p50} failover_p99_us={fetch_p99} lost_acked_updates={} unacked_updates={} unacked_window_us={}",
            t.mismatches,
            t.requests,
            t.updates,
            t.fetch_us.len(),
            t.lost_acked,
            t.unacked_lost,
            t.unacked_window.as_micros()
        );
        Report {
            text,
            figures,
            failure,
        }
    }
}

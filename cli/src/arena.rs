//! `sessio inspect` and `sessio stats`: read an existing arena and render
//! what it holds as text or JSON.
//!
//! Both attach to the arena like any worker does. If no other process has
//! it open, attaching runs the engine's recovery first (it finishes what
//! crashed processes left), exactly as a restarting worker would.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};
use sessio_engine::session::append_items;
use sessio_engine::{Arena, FREE_WALK_DEFAULT, Location, MemoryStats, OpenError, Sid};

/// Sessions listed when `--limit` is not given.
pub const LIST_LIMIT_DEFAULT: usize = 1000;

/// Which arena to open.
#[derive(Args, Debug, Clone)]
pub struct ArenaArg {
    /// Shared-memory arena name (or a path, with --file).
    #[arg(long)]
    pub arena: String,
    /// Treat --arena as a file path (file-backed arena).
    #[arg(long)]
    pub file: bool,
}

impl ArenaArg {
    fn open(&self) -> Result<Arena, String> {
        let loc = if self.file {
            Location::File(PathBuf::from(&self.arena))
        } else {
            Location::Shm(self.arena.clone())
        };
        match Arena::open_existing(&loc) {
            // Looking is allowed, with a warning: the arena is not ours, so
            // its sessions may not be what they seem, and others can read it.
            Err(OpenError::Untrusted { why, .. })
                if why.starts_with("it is owned by") || why.starts_with("its mode") =>
            {
                eprintln!(
                    "sessio: warning: arena {:?} is not this user's alone ({why}); reading it anyway",
                    self.arena
                );
                Arena::open_foreign(&loc)
            }
            r => r,
        }
        .map_err(|e| format!("cannot open arena {:?}: {e}", self.arena))
    }
}

/// Arguments of `sessio inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The arena.
    #[command(flatten)]
    pub arena: ArenaArg,
    /// Show this session's attributes instead of listing sessions.
    #[arg(long)]
    pub sid: Option<String>,
    /// Most sessions listed.
    #[arg(long, default_value_t = LIST_LIMIT_DEFAULT)]
    pub limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `sessio stats`.
#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    /// The arena.
    #[command(flatten)]
    pub arena: ArenaArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `sessio inspect`: the output to print, or why it failed.
pub fn inspect(a: &InspectArgs) -> Result<String, String> {
    let arena = a.arena.open()?;
    match &a.sid {
        Some(sid) => session(&arena, &a.arena.arena, sid, a.json),
        None => Ok(list(&arena, &a.arena.arena, a.limit, a.json)),
    }
}

fn list(arena: &Arena, name: &str, limit: usize, json: bool) -> String {
    let mut sids = arena.sids();
    sids.sort_unstable_by_key(ToString::to_string);
    let total = sids.len();
    let mut rows = Vec::new();
    for sid in sids.into_iter().take(limit) {
        // Gone or expired between the scan and the read: skip it.
        let Ok(g) = arena.read(sid) else { continue };
        let d = g.to_owned();
        let attrs: Vec<(String, usize)> = d
            .attrs
            .iter()
            .map(|a| (a.key.clone(), a.value.len()))
            .collect();
        let acked: Vec<(u16, u64)> = arena
            .acked(sid)
            .map(|a| a.into_iter().filter(|(n, _)| *n != 0).collect())
            .unwrap_or_default();
        rows.push((sid, g.version(), g.epoch(), acked, attrs));
    }
    if json {
        let sessions: Vec<Value> = rows
            .iter()
            .map(|(sid, v, e, acked, attrs)| {
                json!({
                    "sid": sid.to_string(),
                    "version": v,
                    "epoch": e,
                    "acked": acked.iter().map(|(n, v)| json!({"node": n, "version": v})).collect::<Vec<_>>(),
                    "attrs": attrs.iter().map(|(k, n)| json!({"key": k, "bytes": n})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = json!({
            "arena": name,
            "sessions_total": total,
            "sessions": sessions,
        });
        return format!("{out:#}\n");
    }
    let mut out = String::new();
    let _ = writeln!(out, "arena {name}: {total} sessions");
    if !rows.is_empty() {
        let _ = writeln!(
            out,
            "{:<32}  {:>8}  {:>5}  {:<16}  attributes",
            "sid", "version", "epoch", "acked (node@v)"
        );
    }
    for (sid, v, e, acked, attrs) in &rows {
        let attrs: Vec<String> = attrs.iter().map(|(k, n)| format!("{k}({n} B)")).collect();
        let acked: Vec<String> = acked.iter().map(|(n, v)| format!("{n}@{v}")).collect();
        let acked = if acked.is_empty() {
            "-".to_string()
        } else {
            acked.join(",")
        };
        let _ = writeln!(
            out,
            "{sid:<32}  {v:>8}  {e:>5}  {acked:<16}  {}",
            attrs.join(" ")
        );
    }
    if total > rows.len() {
        let _ = writeln!(out, "... {} more (--limit)", total - rows.len());
    }
    out
}

fn session(arena: &Arena, name: &str, sid: &str, json: bool) -> Result<String, String> {
    let sid: Sid = sid
        .parse()
        .map_err(|_| format!("bad SID {sid:?}: expected 32 hex digits"))?;
    let g = arena
        .read(sid)
        .map_err(|e| format!("session {sid} in arena {name:?}: {e}"))?;
    let (version, epoch, checksum_ok) = (g.version(), g.epoch(), g.verify());
    let d = g.to_owned();
    drop(g);
    let acked: Vec<(u16, u64)> = arena
        .acked(sid)
        .map(|a| a.into_iter().filter(|(n, _)| *n != 0).collect())
        .unwrap_or_default();
    if json {
        let attrs: Vec<Value> = d
            .attrs
            .iter()
            .map(|a| {
                let mut v = json!({
                    "key": a.key,
                    "bytes": a.value.len(),
                    "hex": hex::encode(&a.value),
                });
                if let Ok(s) = std::str::from_utf8(&a.value) {
                    v["utf8"] = json!(s);
                }
                v
            })
            .collect();
        let out = json!({
            "arena": name,
            "sid": sid.to_string(),
            "version": version,
            "epoch": epoch,
            "checksum_ok": checksum_ok,
            "created_ms": d.created_ms,
            "updated_ms": d.updated_ms,
            "idle_ttl_ms": d.idle_ttl_ms,
            "expires_at_ms": d.expires_at_ms,
            "acked": acked.iter().map(|(n, v)| json!({"node": n, "version": v})).collect::<Vec<_>>(),
            "attrs": attrs,
        });
        return Ok(format!("{out:#}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(out, "session {sid} in arena {name}");
    let _ = writeln!(
        out,
        "version {version}  epoch {epoch}  checksum {}",
        if checksum_ok { "ok" } else { "BAD" }
    );
    let _ = writeln!(
        out,
        "created_ms {}  updated_ms {}  idle_ttl_ms {}  expires_at_ms {}",
        d.created_ms, d.updated_ms, d.idle_ttl_ms, d.expires_at_ms
    );
    let acked: Vec<String> = acked
        .iter()
        .map(|(n, v)| format!("node {n} at version {v}"))
        .collect();
    let _ = writeln!(
        out,
        "acked by {}",
        if acked.is_empty() {
            "no replica".to_string()
        } else {
            acked.join(", ")
        }
    );
    let _ = writeln!(out, "{} attributes:", d.attrs.len());
    for a in &d.attrs {
        let _ = writeln!(out, "  {}  {} B  {}", a.key, a.value.len(), show(&a.value));
    }
    Ok(out)
}

/// `sessio stats`: the output to print, or why it failed.
pub fn stats(a: &StatsArgs) -> Result<String, String> {
    let arena = a.arena.open()?;
    let s = arena.stats();
    let m = arena.memory(FREE_WALK_DEFAULT);
    let path = arena.path().display().to_string();
    if a.json {
        let out = json!({
            "arena": a.arena.arena,
            "path": path,
            "live": s.live,
            "capacity": s.capacity,
            "created_total": s.created_total,
            "expired_total": s.expired_total,
            "removals_dropped": s.removals_dropped,
            "evicted_total": s.evicted_total,
            "chunks_touched": s.chunks_touched,
            "chunks": s.chunks,
            "chunk_bytes": s.chunk_bytes,
            "mapped_bytes": s.mapped_bytes,
            "handles": s.handles,
            "recoveries": s.recoveries,
            "collections": s.collections,
            "leaked_blocks_returned": s.leaked_blocks_returned,
            "chunks_returned": s.chunks_returned,
            "suspects": s.suspects,
            "last_collect_pause_us": s.last_collect_pause_us,
            "quota_bytes": arena.quota_bytes(),
            "huge_pages": arena.huge_pages(),
            "memory": memory_json(&m),
        });
        return Ok(format!("{out:#}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(out, "arena {} ({path})", a.arena.arena);
    let rows: [(&str, String); 17] = [
        ("live sessions", format!("{} of {}", s.live, s.capacity)),
        ("created_total", s.created_total.to_string()),
        ("expired_total", s.expired_total.to_string()),
        ("removals_dropped", s.removals_dropped.to_string()),
        ("evicted_total", s.evicted_total.to_string()),
        (
            "heap chunks",
            format!(
                "{} touched of {}, {} pooled",
                s.chunks_touched, s.chunks, m.chunks_pooled
            ),
        ),
        ("chunk_bytes", s.chunk_bytes.to_string()),
        ("mapped_bytes", s.mapped_bytes.to_string()),
        ("quota_bytes", arena.quota_bytes().to_string()),
        ("huge_pages", arena.huge_pages().to_string()),
        ("handles open", s.handles.to_string()),
        ("recoveries", s.recoveries.to_string()),
        ("collections", s.collections.to_string()),
        (
            "leaked returned",
            format!("{} blocks", s.leaked_blocks_returned),
        ),
        ("chunks returned", s.chunks_returned.to_string()),
        ("suspects", s.suspects.to_string()),
        (
            "last collect",
            format!("{} µs pause", s.last_collect_pause_us),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<18} {v}");
    }
    memory_text(&mut out, &m);
    Ok(out)
}

/// `bytes`, and per live session when there is one.
fn with_per_session(m: &MemoryStats, bytes: u64) -> String {
    match m.per_session(bytes) {
        Some(per) => format!("{bytes} ({per} per live session)"),
        None => bytes.to_string(),
    }
}

fn memory_text(out: &mut String, m: &MemoryStats) {
    let _ = writeln!(out, "memory (bytes)");
    let touched = m
        .touched_bytes
        .map_or_else(|| "unknown".to_string(), |t| with_per_session(m, t));
    let partial = if m.free_walk_complete {
        ""
    } else {
        " (free lists walked in part: free is a lower bound)"
    };
    let rows: [(&str, String); 10] = [
        ("mapped", with_per_session(m, m.sizing.mapped_bytes)),
        ("reserved", with_per_session(m, m.reserved_bytes)),
        ("touched", touched),
        ("index", format!("{} slots of 64", m.sizing.index_slots)),
        ("fixed tables", m.sizing.fixed_bytes.to_string()),
        ("delta log", m.sizing.delta_log_bytes.to_string()),
        ("heap", m.sizing.heap_bytes.to_string()),
        ("heap in use", with_per_session(m, m.heap_in_use_bytes())),
        (
            "heap free",
            format!("{} in classes{partial}", m.heap_class_free_bytes()),
        ),
        (
            "heap unassigned",
            format!("{} (pooled or never touched)", m.heap_unassigned_bytes()),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<18} {v}");
    }
    if m.classes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:>10}  {:>6}  {:>10}  {:>12}  {:>12}",
        "class", "chunks", "blocks", "in use", "free"
    );
    for c in &m.classes {
        let _ = writeln!(
            out,
            "  {:>10}  {:>6}  {:>10}  {:>12}  {:>12}",
            c.block_bytes,
            c.chunks,
            c.in_use_blocks(),
            c.in_use_bytes(),
            c.free_bytes()
        );
    }
}

fn memory_json(m: &MemoryStats) -> Value {
    json!({
        "live": m.live,
        "mapped_bytes": m.sizing.mapped_bytes,
        "reserved_bytes": m.reserved_bytes,
        "touched_bytes": m.touched_bytes,
        "index_slots": m.sizing.index_slots,
        "index_bytes": m.sizing.index_bytes,
        "fixed_bytes": m.sizing.fixed_bytes,
        "delta_log_bytes": m.sizing.delta_log_bytes,
        "heap_bytes": m.sizing.heap_bytes,
        "heap_in_use_bytes": m.heap_in_use_bytes(),
        "heap_class_free_bytes": m.heap_class_free_bytes(),
        "heap_unassigned_bytes": m.heap_unassigned_bytes(),
        "chunks_touched": m.chunks_touched,
        "chunks_pooled": m.chunks_pooled,
        "free_walk_complete": m.free_walk_complete,
        "per_session": {
            "mapped_bytes": m.per_session(m.sizing.mapped_bytes),
            "touched_bytes": m.touched_bytes.and_then(|t| m.per_session(t)),
            "heap_in_use_bytes": m.per_session(m.heap_in_use_bytes()),
        },
        "classes": m.classes.iter().map(|c| json!({
            "block_bytes": c.block_bytes,
            "chunks": c.chunks,
            "in_use_blocks": c.in_use_blocks(),
            "in_use_bytes": c.in_use_bytes(),
            "free_blocks": c.free_blocks,
            "free_bytes": c.free_bytes(),
        })).collect::<Vec<_>>(),
    })
}

/// Characters of a value shown in text output.
const VALUE_CHARS_MAX: usize = 64;

/// A value for humans: quoted text, an append list's items, or hex.
fn show(v: &[u8]) -> String {
    let clip = |s: String| {
        if s.chars().count() > VALUE_CHARS_MAX {
            let mut c: String = s.chars().take(VALUE_CHARS_MAX).collect();
            c.push('…');
            c
        } else {
            s
        }
    };
    if let Ok(s) = std::str::from_utf8(v)
        && !s.chars().any(char::is_control)
    {
        return clip(format!("{s:?}"));
    }
    if let Some(items) = append_items(v)
        && !items.is_empty()
        && items.iter().all(|i| std::str::from_utf8(i).is_ok())
    {
        let items: Vec<String> = items
            .iter()
            .map(|i| format!("{:?}", String::from_utf8_lossy(i)))
            .collect();
        return clip(format!("list [{}]", items.join(", ")));
    }
    clip(format!("0x{}", hex::encode(v)))
}

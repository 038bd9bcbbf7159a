//! A replica node's [`Store`] split into shards by SID, one lock each, so
//! that a node serving on several threads (one runtime per thread, the
//! threads sharing the port through `SO_REUSEPORT`) applies the batches of
//! different hosts side by side.
//!
//! Every entry of a SID goes to the same shard, in the order it came, so
//! per-session order (what versions and fencing depend on) is kept; entries
//! of different SIDs are independent. A batch is split by shard, each part
//! applied under its shard's lock, and the ack put back in the batch's
//! order. Limits are divided evenly between shards.

use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::HashMap;
use sessio_net::{
    Ack, AckEntry, Counter, DeltaBatch, Invalidate, InvalidateEntry, Message, Pong, Received, Sid,
    Stats, StatsRequest,
};

use super::entry::{AsEntry, EntryRef};
use super::{ExpiryRule, FOLD_IDLE_MS, NodeLimits, STALE_PER_PONG, Store};

/// Most shards (and so node threads) one node runs.
pub const SHARDS_MAX: usize = 64;
/// Most deadlines, and most copies walked, in one shard's expiry pass.
const EXPIRE_BUDGET: usize = 4_096;
/// Idle copies one shard folds per pass (a fold rewrites a record: a few
/// µs each), so a pass holds a shard's lock for a few ms at most.
const FOLD_IDLE_BUDGET: usize = 1_024;
/// Folds in one pass after which the process trims its heap.
const TRIM_AFTER_FOLDS: u64 = 256;

/// A node's copies, in shards by SID.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Mutex<Store>>,
    incarnation: u64,
}

impl Shards {
    /// `n` empty shards (1 to [`SHARDS_MAX`]) sharing `limits` evenly.
    pub fn new(limits: NodeLimits, incarnation: u64, n: usize) -> Shards {
        let n = n.clamp(1, SHARDS_MAX);
        let share = |total: u64| total.div_ceil(n as u64);
        let per = NodeLimits {
            sessions_max: share(limits.sessions_max),
            bytes_max: share(limits.bytes_max),
        };
        Shards {
            shards: (0..n)
                .map(|_| Mutex::new(Store::new(per, incarnation)))
                .collect(),
            incarnation,
        }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Always false: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    fn index(&self, sid: &Sid) -> usize {
        // SIDs are 128 random bits: any 8 of them spread evenly.
        let word = u64::from_le_bytes(sid[8..16].try_into().unwrap_or_default());
        (word % self.shards.len() as u64) as usize
    }

    /// The shard holding `sid`, locked. A shard whose holder panicked is
    /// still consistent (every store step completes before it returns).
    pub fn lock(&self, sid: &Sid) -> MutexGuard<'_, Store> {
        self.lock_at(self.index(sid))
    }

    fn lock_at(&self, i: usize) -> MutexGuard<'_, Store> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers one message from host `from`, as [`Store::handle`] does.
    pub fn handle(&self, from: u64, msg: Received<'_>) -> Option<Message> {
        let msg = match msg {
            Received::DeltaBatch(b) => {
                let ack = self.apply_entries(b.host_id.to_native(), &b.entries);
                let named = b.entries.iter().map(|e| e.new_version.to_native());
                return Some(ack.into_reply(named));
            }
            Received::Message(m) => m,
        };
        match msg {
            Message::DeltaBatch(b) => {
                let named = b.entries.iter().map(|e| e.new_version);
                Some(self.apply_batch(&b).into_reply(named))
            }
            Message::Fetch(f) => Some(Message::FetchReply(self.lock(&f.sid).fetch(f))),
            Message::Invalidate(inv) => {
                self.invalidate(inv);
                None
            }
            Message::Ping(p) => {
                let mut stale = Vec::new();
                for i in 0..self.shards.len() {
                    let room = STALE_PER_PONG - stale.len();
                    if room == 0 {
                        break;
                    }
                    stale.extend(self.lock_at(i).take_stale(from, room));
                }
                Some(Message::Pong(Pong {
                    nonce: p.nonce,
                    stale,
                }))
            }
            Message::StatsRequest(r) => Some(Message::Stats(self.stats(r))),
            // Replies sent to a server are a confused peer; ignore them.
            _ => None,
        }
    }

    /// Applies a batch: each shard's entries in order under its lock; one
    /// ack entry per delta entry, in the batch's order.
    pub fn apply_batch(&self, batch: &DeltaBatch) -> Ack {
        self.apply_entries(batch.host_id, &batch.entries)
    }

    /// [`Shards::apply_batch`] of entries in either form.
    fn apply_entries<T: AsEntry>(&self, host: u64, entries: &[T]) -> Ack {
        let now_ms = sessio_engine::clock::now_ms();
        if self.shards.len() == 1 {
            return self.lock_at(0).apply_entries(host, entries, now_ms);
        }
        let n = entries.len();
        let mut parts: Vec<(Vec<usize>, Vec<EntryRef<'_>>)> =
            (0..self.shards.len()).map(|_| Default::default()).collect();
        for (at, e) in entries.iter().enumerate() {
            let e = e.entry();
            let p = &mut parts[self.index(&e.sid)];
            p.0.push(at);
            p.1.push(e);
        }
        let mut out: Vec<Option<AckEntry>> = vec![None; n];
        for (i, (at, entries)) in parts.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            let ack = self.lock_at(i).apply_entries(host, &entries, now_ms);
            for (pos, entry) in at.into_iter().zip(ack.entries) {
                out[pos] = Some(entry);
            }
        }
        Ack {
            // A store answers every entry, so every position is filled.
            entries: out.into_iter().flatten().collect(),
        }
    }

    /// Drops copies written under an epoch older than each entry's.
    pub fn invalidate(&self, inv: Invalidate) {
        let mut parts: Vec<Vec<InvalidateEntry>> = vec![Vec::new(); self.shards.len()];
        for e in inv.entries {
            parts[self.index(&e.sid)].push(e);
        }
        for (i, entries) in parts.into_iter().enumerate() {
            if !entries.is_empty() {
                self.lock_at(i).invalidate(&Invalidate { entries });
            }
        }
    }

    /// Expires copies in every shard ([`Store::expire`]), each shard's
    /// lock held for at most `EXPIRE_BUDGET` deadlines and (with idle
    /// expiry on) `EXPIRE_BUDGET` copies walked; returns the copies
    /// dropped.
    pub fn expire(&self, now_ms: u64, rule: ExpiryRule) -> u64 {
        (0..self.shards.len())
            .map(|i| self.lock_at(i).expire(now_ms, rule, EXPIRE_BUDGET))
            .sum()
    }

    /// Folds the copies gone idle in every shard ([`Store::fold_idle`]),
    /// each shard's lock held for at most `FOLD_IDLE_BUDGET` copies;
    /// returns the copies folded. After a pass that freed much, the
    /// process gives the allocator's free pages back to the kernel, so an
    /// idle node's resident memory follows what it holds.
    pub fn fold_idle(&self, now_ms: u64) -> u64 {
        let folded: u64 = (0..self.shards.len())
            .map(|i| {
                self.lock_at(i)
                    .fold_idle(now_ms, FOLD_IDLE_MS, FOLD_IDLE_BUDGET)
            })
            .sum();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if folded >= TRIM_AFTER_FOLDS {
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe { libc::malloc_trim(0) };
        }
        folded
    }

    /// The counters of every shard, summed by name.
    pub fn stats(&self, r: StatsRequest) -> Stats {
        let mut sums: Vec<(String, u64)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for i in 0..self.shards.len() {
            for c in self.lock_at(i).stats(r).counters {
                if let Some(&k) = at.get(&c.name) {
                    sums[k].1 += c.value;
                } else {
                    at.insert(c.name.clone(), sums.len());
                    sums.push((c.name, c.value));
                }
            }
        }
        Stats {
            request_id: r.request_id,
            incarnation: self.incarnation,
            counters: sums
                .into_iter()
                .map(|(name, value)| Counter { name, value })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessio_engine::session::{SessionData, encode_session};
    use sessio_net::{AckStatus, Delta, DeltaEntry, Fetch, InvalidateEntry};

    fn full(sid: Sid, version: u64, epoch: u64) -> DeltaEntry {
        DeltaEntry {
            sid,
            base_version: 0,
            new_version: version,
            epoch,
            body: Delta::Full(encode_session(&SessionData::default()).to_vec()),
        }
    }

    fn sid(i: u8) -> Sid {
        let mut s = [i; 16];
        s[8] = i;
        s
    }

    #[test]
    fn batches_split_by_shard_and_acks_keep_their_order() {
        let one = Shards::new(NodeLimits::default(), 1, 1);
        let four = Shards::new(NodeLimits::default(), 1, 4);
        assert_eq!(four.len(), 4);
        // Entries for many SIDs, some twice (a replay, then a fenced one).
        let mut entries: Vec<DeltaEntry> = (0..32).map(|i| full(sid(i), 3, 2)).collect();
        entries.push(full(sid(5), 3, 2));
        entries.push(full(sid(6), 4, 1));
        entries.push(DeltaEntry {
            body: Delta::Ops(vec![1, 2, 3]),
            base_version: 7,
            new_version: 8,
            ..full(sid(7), 8, 2)
        });
        let batch = DeltaBatch {
            host_id: 9,
            entries,
        };
        let a1 = one.apply_batch(&batch);
        let a4 = four.apply_batch(&batch);
        assert_eq!(a1, a4, "sharding changes no answer");
        assert_eq!(a4.entries.len(), batch.entries.len());
        for (e, a) in batch.entries.iter().zip(&a4.entries) {
            assert_eq!(e.sid, a.sid);
        }
        assert_eq!(a4.entries[33].status, AckStatus::Fenced);
        assert_eq!(a4.entries[34].status, AckStatus::NeedFull);
        // Every shard got some of the SIDs.
        for i in 0..4 {
            assert!(!four.lock_at(i).is_empty(), "shard {i} is empty");
        }
        let reply = four.handle(
            9,
            Message::Fetch(Fetch {
                request_id: 1,
                sid: sid(9),
            })
            .into(),
        );
        let Some(Message::FetchReply(r)) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(r.found.map(|f| (f.version, f.epoch)), Some((3, 2)));
        four.invalidate(Invalidate {
            entries: (0..32)
                .map(|i| InvalidateEntry {
                    sid: sid(i),
                    epoch: 3,
                })
                .collect(),
        });
        let stats = four.stats(StatsRequest { request_id: 4 });
        let get = |n: &str| stats.counters.iter().find(|c| c.name == n).unwrap().value;
        assert_eq!(get("sessions"), 0);
        assert_eq!(get("invalidated"), 32);
        assert_eq!(get("applied"), 33);
        assert_eq!(get("fenced"), 1);
        assert_eq!(stats.request_id, 4);
    }

    #[test]
    fn limits_are_shared_between_shards() {
        let s = Shards::new(
            NodeLimits {
                sessions_max: 4,
                bytes_max: 1 << 20,
            },
            1,
            2,
        );
        let ack = s.apply_batch(&DeltaBatch {
            host_id: 1,
            entries: (0..32).map(|i| full(sid(i), 1, 1)).collect(),
        });
        let applied = ack
            .entries
            .iter()
            .filter(|e| e.status == AckStatus::Applied)
            .count();
        assert_eq!(applied, 4, "two per shard");
    }
}

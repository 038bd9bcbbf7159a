//! What each simulated client expects its session to hold: a model of the
//! cart kept apart from the engine (it does not reuse the engine's op
//! code), so a wrong apply, a lost update or a stale fetch shows up as a
//! difference.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::worker::HISTORY_ITEMS_MAX;

/// Items a shopper can put in a cart.
pub const CATALOG: [&str; 8] = [
    "apple", "bread", "cheese", "dates", "eggs", "flour", "grapes", "honey",
];

/// One cart update a client made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CartOp {
    /// Put `qty` of catalog item `item` in the cart (replacing the quantity).
    Add {
        /// Index into [`CATALOG`].
        item: u8,
        /// 1-9.
        qty: u8,
    },
    /// Take catalog item `item` out of the cart.
    Del {
        /// Index into [`CATALOG`].
        item: u8,
    },
}

impl CartOp {
    /// The request line's command and arguments after the SID.
    pub fn request(self) -> (&'static str, String) {
        match self {
            CartOp::Add { item, qty } => ("add", format!("{} {qty}", CATALOG[item as usize])),
            CartOp::Del { item } => ("del", CATALOG[item as usize].to_string()),
        }
    }

    fn history(self) -> String {
        match self {
            CartOp::Add { item, qty } => format!("add {} {qty}", CATALOG[item as usize]),
            CartOp::Del { item } => format!("del {}", CATALOG[item as usize]),
        }
    }
}

/// A cart's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart {
    /// Item index → quantity.
    pub items: BTreeMap<u8, u8>,
    /// The last [`HISTORY_ITEMS_MAX`] changes, oldest first; `None` until
    /// the first change (the attribute does not exist yet).
    pub history: Option<VecDeque<String>>,
}

impl Cart {
    /// Applies one update.
    pub fn apply(&mut self, op: CartOp) {
        match op {
            CartOp::Add { item, qty } => {
                self.items.insert(item, qty);
            }
            CartOp::Del { item } => {
                self.items.remove(&item);
            }
        }
        let h = self.history.get_or_insert_with(VecDeque::new);
        h.push_back(op.history());
        while h.len() > HISTORY_ITEMS_MAX as usize {
            h.pop_front();
        }
    }

    /// The attributes a session holding this cart for `user` must have.
    pub fn attrs(&self, user: &str) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        out.insert("user".to_string(), user.as_bytes().to_vec());
        for (&item, &qty) in &self.items {
            out.insert(
                format!("cart:{}", CATALOG[item as usize]),
                qty.to_string().into_bytes(),
            );
        }
        if let Some(h) = &self.history {
            // The documented append-list layout: `u32 LE length, bytes`.
            let mut v = Vec::new();
            for item in h {
                v.extend_from_slice(&(item.len() as u32).to_le_bytes());
                v.extend_from_slice(item.as_bytes());
            }
            out.insert("history".to_string(), v);
        }
        out
    }
}

/// One acknowledged update: the version it produced and when the client
/// got the answer.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    /// Session version after the update.
    pub version: u64,
    /// The update.
    pub op: CartOp,
    /// When it was acknowledged to the client.
    pub at: Instant,
}

/// A session's expected history: the state at `base_version`, then the
/// updates acknowledged since (kept only while a failover may still cut
/// them back).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// State at `base_version`.
    pub base: Cart,
    /// Version of `base`.
    pub base_version: u64,
    /// Updates after `base`, in version order.
    pub log: Vec<Logged>,
    /// The current state (base plus log).
    pub now: Cart,
    /// The current version.
    pub version: u64,
    /// Whether `log` is kept (else every update folds into `base`).
    pub keep_log: bool,
}

impl Expected {
    /// A fresh session at version 1 (the create).
    pub fn new(keep_log: bool) -> Expected {
        Expected {
            base_version: 1,
            version: 1,
            keep_log,
            ..Expected::default()
        }
    }

    /// Records an acknowledged update that produced `version`.
    pub fn push(&mut self, version: u64, op: CartOp, at: Instant) {
        self.now.apply(op);
        self.version = version;
        if self.keep_log {
            self.log.push(Logged { version, op, at });
        } else {
            self.base = self.now.clone();
            self.base_version = version;
        }
    }

    /// Cuts the history back to `version` (what the bank returned) and
    /// stops keeping a log. Returns the cut updates.
    pub fn cut_to(&mut self, version: u64) -> Vec<Logged> {
        let keep = self.log.iter().take_while(|l| l.version <= version).count();
        let cut = self.log.split_off(keep);
        let mut c = self.base.clone();
        for l in &self.log {
            c.apply(l.op);
        }
        self.now = c.clone();
        self.base = c;
        self.version = self.log.last().map_or(self.base_version, |l| l.version);
        self.base_version = self.version;
        self.log.clear();
        self.keep_log = false;
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_cut_replays() {
        let t = Instant::now();
        let mut e = Expected::new(true);
        for v in 2..=20u64 {
            e.push(
                v,
                CartOp::Add {
                    item: (v % 8) as u8,
                    qty: (v % 9 + 1) as u8,
                },
                t,
            );
        }
        e.push(21, CartOp::Del { item: 3 }, t);
        assert_eq!(e.now.history.as_ref().unwrap().len(), 8);
        assert!(!e.now.items.contains_key(&3));
        let cut = e.cut_to(10);
        assert_eq!(cut.len(), 11);
        assert_eq!(e.version, 10);
        let mut c = Cart::default();
        for v in 2..=10u64 {
            c.apply(CartOp::Add {
                item: (v % 8) as u8,
                qty: (v % 9 + 1) as u8,
            });
        }
        assert_eq!(e.now, c);
        let a = c.attrs("u");
        assert_eq!(a["user"], b"u");
        assert_eq!(a["cart:apple"], b"9");
    }
}

//! The line protocol between the demo driver and its worker processes.
//!
//! Requests, one per line, `SEQ COMMAND ARGS`:
//!
//! | command | args | what the worker does |
//! | --- | --- | --- |
//! | `new` | `USER` | creates a session with `user = USER` |
//! | `add` | `SID ITEM QTY` | sets `cart:ITEM = QTY`, appends `add ITEM QTY` to `history` |
//! | `del` | `SID ITEM` | removes `cart:ITEM`, appends `del ITEM` to `history` |
//! | `view` | `SID` | reads only |
//! | `dump` | `SID` | reads and returns every attribute |
//! | `stats` | | the host replicator's counters |
//!
//! Every request on a SID reads the session first; a miss fetches it from
//! the bank (failover). Answers, one per line, `SEQ STATUS key=value...`:
//! `ok` (with `v`, `e`, `read_ns`, `d` = the [`digest`] of what the read
//! saw before the update, and after a fetch `fetch_us`,
//! `fetched_v`, `fetched`), `gone` (no replica holds the session), `err`
//! (with `why`), `stats`.

use std::collections::BTreeMap;

/// Attributes as `key=hex` joined by `,` (keys hold neither).
pub fn encode_attrs<'a>(attrs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut out = String::new();
    for (k, v) in attrs {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(&hex::encode(v));
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// A digest of a session's attributes (sorted by key), sent with every
/// answer so the driver checks each read against its model.
pub fn digest<'a>(attrs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> u64 {
    xxhash_rust::xxh3::xxh3_64(encode_attrs(attrs).as_bytes())
}

/// The inverse of [`encode_attrs`]; `None` if malformed.
pub fn decode_attrs(s: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    if s == "-" {
        return Some(out);
    }
    for kv in s.split(',') {
        let (k, v) = kv.split_once('=')?;
        out.insert(k.to_string(), hex::decode(v).ok()?);
    }
    Some(out)
}

/// A parsed answer line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The request's sequence number.
    pub seq: u64,
    /// `ok`, `gone`, `err` or `stats`.
    pub status: String,
    /// The `key=value` fields.
    pub fields: BTreeMap<String, String>,
}

impl Answer {
    /// Parses `SEQ STATUS key=value...`.
    pub fn parse(line: &str) -> Option<Answer> {
        let mut it = line.split_whitespace();
        let seq = it.next()?.parse().ok()?;
        let status = it.next()?.to_string();
        let fields = it
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Answer {
            seq,
            status,
            fields,
        })
    }

    /// A numeric field (0 if absent or malformed).
    pub fn num(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A text field.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip() {
        let attrs: Vec<(&str, &[u8])> = vec![("cart:apple", b"3"), ("user", b"\x00\xff")];
        let s = encode_attrs(attrs.iter().copied());
        let back = decode_attrs(&s).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["user"], b"\x00\xff");
        assert_eq!(decode_attrs(&encode_attrs([])).unwrap().len(), 0);
        assert!(decode_attrs("k=abc").is_none());
        assert!(decode_attrs("k=zz").is_none());
    }

    #[test]
    fn answers_parse() {
        let a = Answer::parse("17 ok v=4 e=2 fetched=-").unwrap();
        assert_eq!((a.seq, a.status.as_str(), a.num("v")), (17, "ok", 4));
        assert_eq!(a.get("fetched"), Some("-"));
        assert!(Answer::parse("x ok").is_none());
    }
}

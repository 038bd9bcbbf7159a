//! Session identifiers: 128 bits from the OS CSPRNG, never from client input.

use std::fmt;
use std::str::FromStr;

/// A session identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sid(pub [u8; 16]);

impl Sid {
    /// A fresh SID from the operating system's CSPRNG.
    pub fn random() -> Sid {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the OS random source failed");
        Sid(b)
    }

    /// The two little-endian halves stored in an index slot.
    #[inline]
    pub(crate) fn words(self) -> (u64, u64) {
        let lo = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(self.0[8..].try_into().expect("8 bytes"));
        (lo, hi)
    }

    #[inline]
    pub(crate) fn from_words(lo: u64, hi: u64) -> Sid {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        Sid(b)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sid({self})")
    }
}

/// A string that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a session id is 32 hex digits")]
pub struct ParseSidError;

impl FromStr for Sid {
    type Err = ParseSidError;
    fn from_str(s: &str) -> Result<Sid, ParseSidError> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(ParseSidError);
        }
        let mut b = [0u8; 16];
        for (i, pair) in s.chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| ParseSidError)?;
            b[i] = u8::from_str_radix(hex, 16).map_err(|_| ParseSidError)?;
        }
        Ok(Sid(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let s = Sid::random();
        assert_eq!(s.to_string().parse::<Sid>().unwrap(), s);
        let (lo, hi) = s.words();
        assert_eq!(Sid::from_words(lo, hi), s);
        assert!("xyz".parse::<Sid>().is_err());
        assert!("zz".repeat(16).parse::<Sid>().is_err());
        assert_ne!(Sid::random(), Sid::random());
    }
}

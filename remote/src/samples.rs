//! Samples in an HDR histogram: the form of the replicator's lag
//! ([`crate::replicator::Lag`]), and of any latency a program of the
//! workspace reports by its quantiles.

use hdrhistogram::Histogram;

/// Samples (any unit) in an HDR histogram, 2 significant digits.
#[derive(Debug, Clone)]
pub struct Samples {
    pub(crate) hist: Histogram<u64>,
}

impl Default for Samples {
    /// Auto-resizing: any value fits.
    fn default() -> Self {
        Samples {
            hist: Histogram::new(2).expect("2 significant digits are valid"),
        }
    }
}

impl PartialEq for Samples {
    fn eq(&self, other: &Self) -> bool {
        self.hist == other.hist
    }
}

impl Eq for Samples {}

impl Samples {
    /// Samples told apart from 1 to `high`, in a histogram of fixed size;
    /// [`Samples::record`] counts larger ones as `high`.
    pub fn bounded(high: u64) -> Samples {
        Samples {
            hist: Histogram::new_with_bounds(1, high, 2).expect("valid histogram bounds"),
        }
    }

    /// Records one sample.
    pub fn record(&mut self, v: u64) {
        // `record` grows an auto-resizing histogram to fit; only a value
        // beyond what the histogram holds falls back to the largest it can.
        if self.hist.record(v).is_err() {
            self.hist.saturating_record(v);
        }
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The `q` quantile (0..=1), to 2 significant digits; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut s = Samples::default();
        assert_eq!(s.quantile(0.5), 0);
        for v in 1..=100 {
            s.record(v);
        }
        assert_eq!(s.len(), 100);
        assert_eq!(s.quantile(0.5), 50);
        assert_eq!(s.quantile(0.99), 99);
        s.record(1_000_000_000);
        let top = s.quantile(1.0);
        assert!((990_000_000..=1_010_000_000).contains(&top), "{top}");
    }
}

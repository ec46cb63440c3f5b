//! Median and range of repeated measurements, as the report prints them.

use std::fmt;

/// Median, min and max of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

impl Spread {
    /// `None` for no samples (or any NaN among them).
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = samples.into_iter().collect();
        if v.is_empty() || v.iter().any(|x| x.is_nan()) {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) { f64::midpoint(v[mid - 1], v[mid]) } else { v[mid] };
        Some(Self { median, min: v[0], max: v[v.len() - 1], n: v.len() })
    }

    /// Half the range relative to the median, in percent: how noisy.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 { 0.0 } else { (self.max - self.min) / 2.0 / self.median * 100.0 }
    }

    /// Shows the figures with `decimals` decimals: `295 (290–301)`.
    pub fn with(&self, decimals: usize) -> Shown<'_> {
        Shown { spread: self, decimals }
    }
}

/// A [`Spread`] formatted with a number of decimals.
pub struct Shown<'a> {
    spread: &'a Spread,
    decimals: usize,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, d) = (self.spread, self.decimals);
        if s.n == 1 {
            write!(f, "{:.d$}", s.median)
        } else {
            write!(f, "{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max)
        }
    }
}

/// `1048576` as `1,048,576`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = Spread::of([5.0, 1.0, 3.0]).expect("samples");
        assert_eq!((odd.median, odd.min, odd.max, odd.n), (3.0, 1.0, 5.0, 3));
        let even = Spread::of([4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!(even.median, 2.5);
    }

    #[test]
    fn no_samples_no_spread() {
        assert_eq!(Spread::of([]), None);
    }

    #[test]
    fn shows_median_and_range() {
        let s = Spread::of([290.0, 295.0, 301.0]).expect("samples");
        assert_eq!(s.with(0).to_string(), "295 (290–301)");
        assert_eq!(Spread::of([7.26]).expect("one").with(1).to_string(), "7.3");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1_048_576), "1,048,576");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}

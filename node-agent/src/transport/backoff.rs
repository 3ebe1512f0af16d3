//! Capped, jittered exponential backoff for reconnects. Pure: the caller supplies the randomness.

use std::time::Duration;

/// Delays `base · 2^n` capped at `max`, each drawn uniformly from its upper half ("equal jitter"),
/// so peers that lost each other at the same moment do not redial in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The next delay; `unit` is a uniform random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling / 2 + ceiling.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..6).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(d[0], Duration::from_millis(50));
        assert_eq!(d[1], Duration::from_millis(100));
        assert_eq!(d[3], Duration::from_millis(400));
        assert_eq!(d[5], Duration::from_millis(500), "capped at max/2 with no jitter");
        assert!(b.next_delay(0.999) <= Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }
}

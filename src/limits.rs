//! Rate limiting by token bucket, with the clock passed in (no I/O, testable without waiting).
//!
//! Invariant: `0 <= tokens <= capacity`. A bucket refills at `per_second` tokens a second up
//! to `capacity` (its burst); taking a token when fewer than one is left fails and changes
//! nothing, so a client over its rate is refused rather than queued.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket allowing `per_second` on average and bursts of `burst_seconds` worth.
    pub fn new(per_second: u32, burst_seconds: f64, now: Instant) -> Self {
        let per_second = f64::from(per_second.max(1));
        let capacity = (per_second * burst_seconds).max(1.0);
        Self {
            per_second,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Whether the bucket would be full at `now`: it then remembers nothing a fresh one would
    /// not, and may be forgotten.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.capacity
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 2.0, start);
        let taken = (0..25).filter(|_| bucket.try_take(start)).count();
        assert_eq!(taken, 20, "the burst is two seconds' worth");
        assert!(!bucket.try_take(start + Duration::from_millis(50)));
        assert!(
            bucket.try_take(start + Duration::from_millis(100)),
            "refills at 10/s"
        );
        assert!(!bucket.try_take(start + Duration::from_millis(100)));
        // A long pause refills to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..25).filter(|_| bucket.try_take(later)).count(), 20);
    }

    #[test]
    fn a_clock_going_backwards_takes_nothing_extra() {
        let start = Instant::now() + Duration::from_secs(1);
        let mut bucket = TokenBucket::new(1, 1.0, start);
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start - Duration::from_millis(500)));
    }
}

//! Per-sender message budgets: a token bucket per topic id, so that one participant flooding its
//! own topics (a bug, or a compromised client) costs the server a map lookup per message and
//! never starves the others.
//!
//! Keyed by the id in the topic, not by the message's `from`: the broker's ACL binds topics to
//! authenticated users, while `from` is only checked by the signature, which is what a flood
//! should not get to cost.

use std::collections::HashMap;
use std::time::Instant;

/// Senders tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the budget.
    Admit,
    /// Over the budget: drop it. `first`: the first drop since the sender was last within its
    /// budget (log it; later drops of the same episode are silent).
    Drop {
        /// First drop of this episode.
        first: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    dropping: bool,
}

/// Token buckets by sender: `burst` messages at once, refilled at `per_s` a second.
#[derive(Debug, Clone)]
pub struct SenderBudget {
    burst: f64,
    per_s: f64,
    buckets: HashMap<String, Bucket>,
}

impl SenderBudget {
    /// Budgets of `burst` messages refilled at `per_s` per second.
    pub fn new(burst: u32, per_s: f64) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_s: per_s.max(0.0),
            buckets: HashMap::new(),
        }
    }

    /// The burst and the rate.
    pub fn limits(&self) -> (f64, f64) {
        (self.burst, self.per_s)
    }

    /// Charges one message from `sender` at `now`.
    pub fn admit(&mut self, sender: &str, now: Instant) -> Verdict {
        if !self.buckets.contains_key(sender) && self.buckets.len() >= MAX_TRACKED {
            self.forget_idle(now);
        }
        let (burst, per_s) = (self.burst, self.per_s);
        let b = self.buckets.entry(sender.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
            dropping: false,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * per_s).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.dropping = false;
            Verdict::Admit
        } else {
            let first = !b.dropping;
            b.dropping = true;
            Verdict::Drop { first }
        }
    }

    /// Forgets senders whose bucket has refilled: they are indistinguishable from new ones.
    fn forget_idle(&mut self, now: Instant) {
        let (burst, per_s) = (self.burst, self.per_s);
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + dt * per_s < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_sender_is_cut_off_and_others_are_not() {
        let mut b = SenderBudget::new(5, 2.0);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.admit("client-1", t0), Verdict::Admit);
        }
        assert_eq!(b.admit("client-1", t0), Verdict::Drop { first: true });
        for _ in 0..100 {
            assert_eq!(b.admit("client-1", t0), Verdict::Drop { first: false });
        }
        // Another sender is untouched.
        assert_eq!(b.admit("client-2", t0), Verdict::Admit);
        // Half a second refills one message; the episode ends, a new one would log again.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.admit("client-1", t1), Verdict::Admit);
        assert_eq!(b.admit("client-1", t1), Verdict::Drop { first: true });
        // A long pause refills the burst, not more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(b.admit("client-1", t2), Verdict::Admit);
        }
        assert!(matches!(b.admit("client-1", t2), Verdict::Drop { .. }));
    }

    #[test]
    fn the_map_of_senders_stays_bounded() {
        let mut b = SenderBudget::new(2, 1000.0);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED + 10 {
            b.admit(&format!("c{i}"), t0);
        }
        assert!(b.buckets.len() <= MAX_TRACKED + 10);
        // Once they have refilled, idle senders are forgotten when room is needed.
        let later = t0 + Duration::from_secs(1);
        b.admit("newcomer", later);
        assert!(b.buckets.len() < 10, "{}", b.buckets.len());
    }
}

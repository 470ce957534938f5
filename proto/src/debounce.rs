//! Per-key debouncing: at most one application per key per interval, the latest value wins.
//!
//! The coordinator uses it for endpoint reports: a member that posts a thousand reports a
//! second gets one registry write (and at most one netmap version) a second, not a thousand
//! fsyncs. Time comes in as an argument (a monotonic [`Duration`] since any fixed start).

use std::collections::BTreeMap;
use std::time::Duration;

/// What to do with a value just handed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<V> {
    /// Apply it now.
    Apply(V),
    /// Kept (replacing any value kept before for this key) until `at`; `schedule` is true
    /// when nothing was waiting for this key yet, so the caller must arrange a
    /// [`Debouncer::poll_due`] at `at`.
    Deferred { at: Duration, schedule: bool },
}

/// The debouncer: last application time and the waiting value, per key.
#[derive(Debug, Clone)]
pub struct Debouncer<K, V> {
    interval: Duration,
    last: BTreeMap<K, Duration>,
    waiting: BTreeMap<K, V>,
}

impl<K: Ord + Clone, V> Debouncer<K, V> {
    pub fn new(interval: Duration) -> Self {
        Debouncer {
            interval,
            last: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// A new value for `key` at `now`.
    pub fn handle(&mut self, key: K, value: V, now: Duration) -> Decision<V> {
        let due = self.last.get(&key).map(|t| *t + self.interval);
        match due {
            Some(at) if at > now => {
                let schedule = self.waiting.insert(key, value).is_none();
                Decision::Deferred { at, schedule }
            }
            _ => {
                self.waiting.remove(&key);
                self.last.insert(key, now);
                Decision::Apply(value)
            }
        }
    }

    /// The waiting values whose time has come, to apply now.
    pub fn poll_due(&mut self, now: Duration) -> Vec<(K, V)> {
        let due: Vec<K> = self
            .waiting
            .keys()
            .filter(|k| self.last.get(*k).is_none_or(|t| *t + self.interval <= now))
            .cloned()
            .collect();
        due.into_iter()
            .filter_map(|k| {
                let v = self.waiting.remove(&k)?;
                self.last.insert(k.clone(), now);
                Some((k, v))
            })
            .collect()
    }

    /// When the next waiting value is due, if any.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.waiting
            .keys()
            .filter_map(|k| self.last.get(k).map(|t| *t + self.interval))
            .min()
    }

    /// Forget keys last applied before `now - keep` with nothing waiting (bounded memory).
    pub fn prune(&mut self, now: Duration, keep: Duration) {
        let waiting = &self.waiting;
        self.last
            .retain(|k, t| waiting.contains_key(k) || *t + keep > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_applies_then_the_latest_waits_for_the_interval() {
        let mut d = Debouncer::new(S);
        assert_eq!(d.handle("a", 1, ms(0)), Decision::Apply(1));
        assert_eq!(
            d.handle("a", 2, ms(10)),
            Decision::Deferred {
                at: ms(1000),
                schedule: true
            }
        );
        assert_eq!(
            d.handle("a", 3, ms(20)),
            Decision::Deferred {
                at: ms(1000),
                schedule: false
            }
        );
        // Another key is independent.
        assert_eq!(d.handle("b", 9, ms(20)), Decision::Apply(9));
        assert_eq!(d.poll_timeout(), Some(ms(1000)));
        assert!(d.poll_due(ms(999)).is_empty());
        assert_eq!(d.poll_due(ms(1000)), vec![("a", 3)]);
        assert_eq!(d.poll_timeout(), None);
        // After a quiet interval, applied at once again.
        assert_eq!(d.handle("a", 4, ms(2500)), Decision::Apply(4));
        d.prune(ms(10_000), S);
        assert!(d.last.is_empty());
    }

    proptest! {
        /// However fast values come, applications of one key are at least an interval apart,
        /// and the last value handed in is applied in the end.
        #[test]
        fn at_most_one_application_per_interval(gaps in prop::collection::vec(0u64..1500, 1..200)) {
            let mut d = Debouncer::new(S);
            let mut now = Duration::ZERO;
            let mut applied: Vec<(Duration, u64)> = Vec::new();
            for (i, g) in gaps.iter().enumerate() {
                now += ms(*g);
                for (_, v) in d.poll_due(now) {
                    applied.push((now, v));
                }
                if let Decision::Apply(v) = d.handle(0u8, i as u64, now) {
                    applied.push((now, v));
                }
            }
            now += S;
            for (_, v) in d.poll_due(now) {
                applied.push((now, v));
            }
            for w in applied.windows(2) {
                prop_assert!(w[1].0 >= w[0].0 + S, "{:?}", applied);
            }
            prop_assert_eq!(applied.last().map(|a| a.1), Some(gaps.len() as u64 - 1));
        }
    }
}

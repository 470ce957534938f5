//! Which netmap version each host has received, as its long-polls tell: a host asks for
//! `GET /v1/netmap?since=V` right after it took version V. A rotation waits here until every
//! host that follows the coordinator has taken the version carrying the next key (so its
//! device accepts that key before anything routes to it), instead of sleeping a fixed time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A host whose last poll is older than this no longer counts as following (it is offline,
/// or its long-poll broke): nobody waits for it. A long-poll lasts `LONG_POLL_SECS` (25 s).
pub const FOLLOWING: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy)]
struct Seen {
    version: u64,
    at: Instant,
    /// A long-poll is parked right now (its `since` is `version`).
    parked: bool,
}

/// The acknowledgements, shared by the API handlers and the rotations.
#[derive(Debug)]
pub struct Acks {
    seen: Mutex<HashMap<IpAddr, Seen>>,
    changed: watch::Sender<u64>,
    /// When this coordinator process started: until every follower polled once (or
    /// [`FOLLOWING`] passed), it cannot know who follows.
    started: Instant,
}

impl Default for Acks {
    fn default() -> Self {
        Acks {
            seen: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            started: Instant::now(),
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// Hosts that took the version.
    pub acknowledged: usize,
    /// Followers that had not taken it when the wait timed out.
    pub missing: Vec<IpAddr>,
    pub waited: Duration,
}

impl Acks {
    /// A long-poll from `host` asking for versions after `since` arrived (it holds `since`).
    pub fn poll_started(&self, host: IpAddr, since: u64) {
        self.update(host, since, true);
    }

    /// How many long-polls are parked right now.
    pub fn parked(&self) -> usize {
        self.seen
            .lock()
            .map_or(0, |seen| seen.values().filter(|s| s.parked).count())
    }

    /// That long-poll returned (with a newer netmap or a 304).
    pub fn poll_ended(&self, host: IpAddr, since: u64) {
        self.update(host, since, false);
    }

    fn update(&self, host: IpAddr, since: u64, parked: bool) {
        if let Ok(mut seen) = self.seen.lock() {
            let version = seen.get(&host).map_or(since, |s| s.version.max(since));
            seen.insert(
                host,
                Seen {
                    version,
                    at: Instant::now(),
                    parked,
                },
            );
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The followers (a poll parked now, or one within [`FOLLOWING`]) that have not taken
    /// `version`, `except` left out.
    fn behind(&self, version: u64, except: &[IpAddr]) -> (usize, Vec<IpAddr>) {
        let Ok(seen) = self.seen.lock() else {
            return (0, Vec::new());
        };
        let mut acked = 0;
        let mut behind = Vec::new();
        for (ip, s) in seen.iter() {
            if except.contains(ip) || !(s.parked || s.at.elapsed() < FOLLOWING) {
                continue;
            }
            if s.version >= version {
                acked += 1;
            } else {
                behind.push(*ip);
            }
        }
        behind.sort();
        (acked, behind)
    }

    /// Right after the coordinator (re)started nobody has polled yet, so "every follower took
    /// it" would be vacuously true. Wait until each of `expected` (the joined daemon hosts) has
    /// polled once since the start, or until [`FOLLOWING`] after the start (an offline host
    /// never comes; it catches up from a key notice). Returns those still missing.
    pub async fn wait_returned(&self, expected: &[IpAddr]) -> Vec<IpAddr> {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let missing = self.not_returned(expected);
            let left = FOLLOWING.saturating_sub(self.started.elapsed());
            if missing.is_empty()
                || left.is_zero()
                || tokio::time::timeout(left, rx.changed()).await.is_err()
            {
                return missing;
            }
        }
    }

    /// Those of `expected` that have not polled since the start.
    fn not_returned(&self, expected: &[IpAddr]) -> Vec<IpAddr> {
        match self.seen.lock() {
            Ok(seen) => expected
                .iter()
                .filter(|ip| !seen.contains_key(ip))
                .copied()
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether [`Acks::wait_returned`] would return at once.
    pub fn returned(&self, expected: &[IpAddr]) -> bool {
        self.started.elapsed() >= FOLLOWING || self.not_returned(expected).is_empty()
    }

    /// Wait until every following host but `except` has taken `version`, at most `timeout`.
    pub async fn wait(&self, version: u64, except: &[IpAddr], timeout: Duration) -> AckOutcome {
        let started = Instant::now();
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let (acknowledged, missing) = self.behind(version, except);
            if missing.is_empty() {
                return AckOutcome {
                    acknowledged,
                    missing,
                    waited: started.elapsed(),
                };
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                let (acknowledged, missing) = self.behind(version, except);
                return AckOutcome {
                    acknowledged,
                    missing,
                    waited: started.elapsed(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 99, 99, n])
    }

    #[tokio::test]
    async fn a_wait_ends_when_every_follower_took_the_version() {
        let acks = std::sync::Arc::new(Acks::default());
        acks.poll_started(ip(2), 7);
        acks.poll_started(ip(3), 7);
        acks.poll_started(ip(9), 7); // the rotating host itself
        let a = acks.clone();
        let waiter = tokio::spawn(async move { a.wait(8, &[ip(9)], Duration::from_secs(5)).await });
        acks.poll_ended(ip(2), 7);
        acks.poll_started(ip(2), 8);
        acks.poll_ended(ip(3), 7);
        acks.poll_started(ip(3), 8);
        let out = waiter.await.expect("join");
        assert_eq!(out.acknowledged, 2);
        assert!(out.missing.is_empty());
        assert!(out.waited < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn after_a_start_the_followers_are_awaited_until_they_polled_once() {
        let acks = std::sync::Arc::new(Acks::default());
        let a = acks.clone();
        let waiter = tokio::spawn(async move { a.wait_returned(&[ip(2), ip(3)]).await });
        acks.poll_started(ip(2), 7);
        acks.poll_started(ip(3), 7);
        let missing = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("in time")
            .expect("join");
        assert!(missing.is_empty());
        let late = Acks {
            started: Instant::now() - FOLLOWING,
            ..Acks::default()
        };
        assert_eq!(late.wait_returned(&[ip(4)]).await, vec![ip(4)]);
    }

    #[tokio::test]
    async fn a_follower_that_never_comes_back_is_named_after_the_timeout() {
        let acks = Acks::default();
        acks.poll_started(ip(2), 7);
        acks.poll_started(ip(3), 8);
        let out = acks.wait(8, &[], Duration::from_millis(50)).await;
        assert_eq!(out.acknowledged, 1);
        assert_eq!(out.missing, vec![ip(2)]);
    }

    #[tokio::test]
    async fn nobody_waits_for_a_host_that_stopped_polling_long_ago() {
        let acks = Acks::default();
        if let Ok(mut seen) = acks.seen.lock() {
            seen.insert(
                ip(4),
                Seen {
                    version: 1,
                    at: Instant::now() - FOLLOWING - Duration::from_secs(1),
                    parked: false,
                },
            );
        }
        let out = acks.wait(8, &[], Duration::from_secs(5)).await;
        assert!(out.missing.is_empty());
        assert!(out.waited < Duration::from_secs(1));
    }
}

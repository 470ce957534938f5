//! The handshake gate: which handshake messages the engine spends Diffie-Hellman work on.
//!
//! Pure logic (no I/O, no clock, no randomness): the caller passes the time as a monotonic
//! [`Duration`] since any fixed origin, and does the MAC checks and the cookie replies itself
//! (with boringtun's `RateLimiter`). The rules, after the WireGuard paper (section 5.3) and
//! the Linux implementation:
//!
//! * **Under load.** Every handshake message with a valid MAC1 takes a token from one
//!   device-wide bucket ([`GateConfig::load`]). When that bucket is empty — more handshake
//!   messages arrive than the engine budgets for — or a receive batch shows a backlog of
//!   handshakes ([`HandshakeGate::note_backlog`]), the engine is *under load* for
//!   [`GateConfig::load_hold`] after the last such sign. Under load a handshake message must
//!   carry a valid MAC2 (a cookie, which proves the sender receives at its source address);
//!   one without gets a cookie reply and no further work.
//! * **Per source.** Each source address (IPv4 /32, IPv6 /64 as one address) has two buckets.
//!   Handshakes accepted without a cookie take from the *anonymous* bucket; when it is empty
//!   that source must show a cookie even when the engine is not under load. Anyone on the
//!   underlay can spoof a source address and drain its anonymous bucket, which is why a
//!   drained source is asked for a cookie rather than refused: the real owner gets the cookie
//!   and comes back through the *proven* bucket, which only a sender that receives at the
//!   address can use.
//! * **Bounded work.** The time the engine spends on handshakes (Diffie-Hellman work, measured
//!   by the caller and charged with [`HandshakeGate::charge_work`]) comes out of one
//!   device-wide bucket of seconds ([`GateConfig::work`]); while it is in debt and the engine
//!   is under load, handshakes are refused (outside load at most the load budget of
//!   handshakes arrives anyway, and a legitimate one is never refused for a thread that was
//!   merely descheduled while it was timed). Senders who do hold cookies for many addresses they own thus cannot take more
//!   than that share of a core and starve the data path (which the same workers serve). It is
//!   a time budget, not a count, so it holds on a slow machine or a debug build too.
//! * **Bounded memory.** At most [`GateConfig::max_sources`] addresses are tracked. An entry
//!   whose buckets are both full says nothing a missing entry would not, so it is dropped when
//!   room is needed; when every entry is busy a new source is refused until one idles.
//!   Entries are created only for handshakes that were admitted (never for ones answered with
//!   a cookie), so spoofed sources cannot fill the table while the engine is under load.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// A token bucket's shape: `burst` tokens at most, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketConfig {
    pub per_sec: f64,
    pub burst: f64,
}

/// A token bucket. Time is passed in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(cfg: &BucketConfig, now: Duration) -> Self {
        TokenBucket {
            tokens: cfg.burst,
            last: now,
        }
    }

    fn refill(&mut self, cfg: &BucketConfig, now: Duration) {
        // A clock that went backwards (it should not) refills nothing.
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cfg.per_sec).min(cfg.burst);
        self.last = self.last.max(now);
    }

    /// Whether a token is available at `now` (refills, takes nothing).
    pub fn available(&mut self, cfg: &BucketConfig, now: Duration) -> bool {
        self.refill(cfg, now);
        self.tokens >= 1.0
    }

    /// Take one token if there is one.
    pub fn take(&mut self, cfg: &BucketConfig, now: Duration) -> bool {
        self.refill(cfg, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket holds anything at `now` (it may be in debt after [`Self::spend`]).
    pub fn has_credit(&mut self, cfg: &BucketConfig, now: Duration) -> bool {
        self.refill(cfg, now);
        self.tokens > 0.0
    }

    /// Spend `amount` (which may exceed what is there: the debt, bounded by one burst, is
    /// paid back by the refill before anything more is allowed).
    pub fn spend(&mut self, cfg: &BucketConfig, now: Duration, amount: f64) {
        self.refill(cfg, now);
        self.tokens = (self.tokens - amount).max(-cfg.burst);
    }

    /// Whether the bucket is full at `now` (an idle bucket, equivalent to a fresh one).
    pub fn is_full(&mut self, cfg: &BucketConfig, now: Duration) -> bool {
        self.refill(cfg, now);
        self.tokens >= cfg.burst
    }
}

/// The gate's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// Handshake messages (valid MAC1) the engine handles per second before it is under load.
    pub load: BucketConfig,
    /// How long the engine stays under load after the last sign of load.
    pub load_hold: Duration,
    /// Handshakes a source may have handled without a cookie.
    pub anonymous: BucketConfig,
    /// Handshakes a source that showed a valid cookie may have handled.
    pub proven: BucketConfig,
    /// Seconds of handshake work (Diffie-Hellman) the whole device spends per second, whoever
    /// the senders are.
    pub work: BucketConfig,
    /// Most source addresses tracked at once.
    pub max_sources: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            // boringtun's device budget: 100 handshakes a second.
            load: BucketConfig {
                per_sec: 100.0,
                burst: 100.0,
            },
            // wireguard-go's UnderLoadAfterTime.
            load_hold: Duration::from_secs(1),
            // A healthy peer sends a few handshake messages every two minutes (retries every
            // five seconds); five a second with a burst of ten leaves room for rotations.
            anonymous: BucketConfig {
                per_sec: 5.0,
                burst: 10.0,
            },
            // Linux's per-source handshake limit is 20 a second with a burst of 5.
            proven: BucketConfig {
                per_sec: 20.0,
                burst: 10.0,
            },
            // A tenth of a core (a handshake is three X25519 operations, about 0.1 ms in a
            // release build: some 1000 a second).
            work: BucketConfig {
                per_sec: 0.1,
                burst: 0.02,
            },
            max_sources: 4096,
        }
    }
}

/// What the gate says about one handshake message after its MACs were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Do the handshake.
    Process,
    /// Refused: this source used up its budget (or the table is full of busy sources).
    RateLimited,
    /// Refused: the device spent its handshake time budget for now.
    Busy,
}

/// The key a source is tracked under: IPv4 addresses whole, IPv6 by /64 (one host usually
/// owns a whole /64, as Linux's ratelimiter assumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl SourceKey {
    pub fn of(addr: IpAddr) -> SourceKey {
        match addr {
            IpAddr::V4(a) => SourceKey::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let mut k = [0u8; 8];
                    k.copy_from_slice(&a.octets()[..8]);
                    SourceKey::V6(k)
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    anonymous: TokenBucket,
    proven: TokenBucket,
}

/// The gate's state.
#[derive(Debug)]
pub struct HandshakeGate {
    cfg: GateConfig,
    load: TokenBucket,
    work: TokenBucket,
    under_load_until: Option<Duration>,
    sources: HashMap<SourceKey, Source>,
    /// When the table was last swept for idle entries (a full table is swept at most once per
    /// `load_hold`, so a flood of new sources cannot make every packet an O(n) sweep).
    last_sweep: Option<Duration>,
}

impl HandshakeGate {
    pub fn new(cfg: GateConfig, now: Duration) -> Self {
        HandshakeGate {
            load: TokenBucket::full(&cfg.load, now),
            work: TokenBucket::full(&cfg.work, now),
            under_load_until: None,
            sources: HashMap::new(),
            last_sweep: None,
            cfg,
        }
    }

    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    /// Whether the engine is under load at `now`.
    pub fn under_load(&self, now: Duration) -> bool {
        self.under_load_until.is_some_and(|until| now < until)
    }

    fn set_under_load(&mut self, now: Duration) {
        self.under_load_until = Some(now + self.cfg.load_hold);
    }

    /// A handshake message with a valid MAC1 arrived (whatever happens to it next): it counts
    /// towards the load.
    pub fn note_handshake(&mut self, now: Duration) {
        if !self.load.take(&self.cfg.load, now) {
            self.set_under_load(now);
        }
    }

    /// One receive batch held `handshakes` handshake messages out of `received` datagrams, in
    /// a batch of `capacity`: a full batch with at least an eighth of it handshakes means
    /// handshakes are queueing in the socket (the kernel's and wireguard-go's sign of load).
    pub fn note_backlog(
        &mut self,
        now: Duration,
        received: usize,
        capacity: usize,
        handshakes: usize,
    ) {
        if capacity > 0 && received >= capacity && handshakes * 8 >= capacity {
            self.set_under_load(now);
        }
    }

    /// Whether a handshake message from `addr` must carry a valid cookie (MAC2) at `now`:
    /// under load, or once the source's anonymous budget is spent. Takes nothing.
    pub fn cookie_required(&mut self, addr: IpAddr, now: Duration) -> bool {
        if self.under_load(now) {
            return true;
        }
        let cfg = self.cfg.anonymous;
        match self.sources.get_mut(&SourceKey::of(addr)) {
            Some(s) => !s.anonymous.available(&cfg, now),
            None => false,
        }
    }

    /// A handshake message from `addr` passed its MAC checks (`proven`: it carried a valid
    /// cookie): take its token.
    pub fn admit(&mut self, addr: IpAddr, now: Duration, proven: bool) -> Admit {
        let key = SourceKey::of(addr);
        if !self.sources.contains_key(&key) && !self.make_room(now) {
            return Admit::RateLimited;
        }
        let (anon_cfg, proven_cfg) = (self.cfg.anonymous, self.cfg.proven);
        let s = self.sources.entry(key).or_insert_with(|| Source {
            anonymous: TokenBucket::full(&anon_cfg, now),
            proven: TokenBucket::full(&proven_cfg, now),
        });
        let ok = if proven {
            s.proven.take(&proven_cfg, now)
        } else {
            s.anonymous.take(&anon_cfg, now)
        };
        if !ok {
            Admit::RateLimited
        } else if self.under_load(now) && !self.work.has_credit(&self.cfg.work, now) {
            Admit::Busy
        } else {
            Admit::Process
        }
    }

    /// An admitted handshake took `spent` of work: charge it to the device's budget.
    pub fn charge_work(&mut self, now: Duration, spent: Duration) {
        let cfg = self.cfg.work;
        self.work.spend(&cfg, now, spent.as_secs_f64());
    }

    /// Make room for one more source; false if the table is full of busy sources.
    fn make_room(&mut self, now: Duration) -> bool {
        if self.sources.len() < self.cfg.max_sources {
            return true;
        }
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.load_hold)
        {
            return false;
        }
        self.sweep(now);
        self.sources.len() < self.cfg.max_sources
    }

    /// Forget sources whose buckets are both full again (idle).
    pub fn sweep(&mut self, now: Duration) {
        self.last_sweep = Some(now);
        let (a, p) = (self.cfg.anonymous, self.cfg.proven);
        self.sources
            .retain(|_, s| !(s.anonymous.is_full(&a, now) && s.proven.is_full(&p, now)));
    }

    /// How many sources are tracked.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i))
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let cfg = BucketConfig {
            per_sec: 10.0,
            burst: 3.0,
        };
        let mut b = TokenBucket::full(&cfg, ms(0));
        assert!(b.take(&cfg, ms(0)));
        assert!(b.take(&cfg, ms(0)));
        assert!(b.take(&cfg, ms(0)));
        assert!(!b.take(&cfg, ms(0)), "burst spent");
        assert!(!b.take(&cfg, ms(50)), "half a token after 50 ms");
        assert!(b.take(&cfg, ms(100)), "one token after 100 ms");
        assert!(!b.take(&cfg, ms(100)));
        // Refill stops at the burst.
        assert!(b.is_full(&cfg, ms(10_000)));
        for _ in 0..3 {
            assert!(b.take(&cfg, ms(10_000)));
        }
        assert!(!b.take(&cfg, ms(10_000)));
    }

    #[test]
    fn a_clock_that_goes_backwards_refills_nothing() {
        let cfg = BucketConfig {
            per_sec: 1.0,
            burst: 1.0,
        };
        let mut b = TokenBucket::full(&cfg, ms(5000));
        assert!(b.take(&cfg, ms(5000)));
        assert!(!b.take(&cfg, ms(1000)));
        // Time is measured from the latest instant seen, not from the earlier one.
        assert!(!b.take(&cfg, ms(5500)));
        assert!(b.take(&cfg, ms(6000)));
    }

    #[test]
    fn the_engine_is_under_load_past_its_budget_and_for_the_hold_time_after() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        for _ in 0..100 {
            g.note_handshake(ms(10));
        }
        assert!(!g.under_load(ms(10)), "the budget itself is not load");
        g.note_handshake(ms(10));
        assert!(g.under_load(ms(10)));
        assert!(
            g.cookie_required(v4(1), ms(10)),
            "under load everyone needs a cookie"
        );
        assert!(g.under_load(ms(1009)));
        assert!(
            !g.under_load(ms(1010)),
            "load ends a hold time after the last sign"
        );
        assert!(!g.cookie_required(v4(1), ms(1010)));
    }

    #[test]
    fn a_steady_flood_keeps_the_engine_under_load() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        // 1000 handshakes a second for ten seconds (one per millisecond).
        let mut loaded = 0;
        for t in 0..10_000u64 {
            g.note_handshake(ms(t));
            if g.under_load(ms(t)) {
                loaded += 1;
            }
        }
        assert!(loaded > 9_800, "under load {loaded} of 10000 ms");
    }

    #[test]
    fn a_backlog_of_handshakes_in_a_full_batch_is_load() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        g.note_backlog(ms(0), 63, 64, 64);
        assert!(
            !g.under_load(ms(0)),
            "a batch that is not full is no backlog"
        );
        g.note_backlog(ms(0), 64, 64, 7);
        assert!(!g.under_load(ms(0)), "mostly data is no handshake backlog");
        g.note_backlog(ms(0), 64, 64, 8);
        assert!(g.under_load(ms(0)));
    }

    #[test]
    fn a_source_past_its_anonymous_budget_needs_a_cookie_and_then_uses_its_proven_budget() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        let a = v4(1);
        for _ in 0..10 {
            assert!(!g.cookie_required(a, ms(0)));
            assert_eq!(g.admit(a, ms(0), false), Admit::Process);
        }
        assert!(g.cookie_required(a, ms(0)), "anonymous burst spent");
        assert!(
            !g.cookie_required(v4(2), ms(0)),
            "another source is not affected"
        );
        assert!(!g.under_load(ms(0)));
        // With a cookie the source has its own proven budget (which a spoofer cannot spend).
        for _ in 0..10 {
            assert_eq!(g.admit(a, ms(0), true), Admit::Process);
        }
        assert_eq!(g.admit(a, ms(0), true), Admit::RateLimited);
        assert_eq!(g.admit(a, ms(50), true), Admit::Process, "20/s refill");
        // The anonymous budget comes back at 5/s.
        assert!(g.cookie_required(a, ms(100)));
        assert!(!g.cookie_required(a, ms(200)));
    }

    #[test]
    fn ipv6_sources_are_limited_per_64() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(g.admit(a, ms(0), false), Admit::Process);
        }
        assert!(g.cookie_required(b, ms(0)), "same /64");
        assert!(!g.cookie_required(c, ms(0)), "another /64");
        // A v4-mapped address is the IPv4 source.
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        assert_eq!(SourceKey::of(mapped), SourceKey::of(v4(1)));
        assert_ne!(
            SourceKey::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            SourceKey::of(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn many_cookie_holding_sources_together_get_no_more_than_the_time_budget() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        // 1000 sources that each hold a valid cookie, 20 handshakes a second each (their own
        // limit) for 5 s, each handshake taking 1 ms (a slow machine): 100 s of work offered.
        let mut processed = 0;
        for t in 0..100u64 {
            for i in 0..1000 {
                let now = ms(t * 50);
                g.note_handshake(now);
                if g.admit(v4(i), now, true) == Admit::Process {
                    g.charge_work(now, ms(1));
                    processed += 1;
                }
            }
        }
        // 0.1 s of work a second for 5 s plus the burst: about 520 ms of work, i.e. some 520
        // handshakes of 1 ms (one of overdraft per refill step at most).
        assert!(processed <= 620, "{processed} handshakes processed");
        assert!(
            processed >= 400,
            "{processed}: the budget is used, not starved"
        );
    }

    #[test]
    fn a_debt_is_paid_back_before_the_next_handshake() {
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        for _ in 0..200 {
            g.note_handshake(ms(0));
        }
        assert_eq!(g.admit(v4(1), ms(0), true), Admit::Process);
        // One very slow handshake: the debt is capped at one burst (20 ms of work)...
        g.charge_work(ms(0), Duration::from_secs(5));
        assert_eq!(g.admit(v4(2), ms(100), true), Admit::Busy);
        // ...and repaid at 0.1 s a second: from -20 ms back above zero takes 200 ms.
        assert_eq!(g.admit(v4(3), ms(190), true), Admit::Busy);
        assert_eq!(g.admit(v4(4), ms(210), true), Admit::Process);
        // Outside load the time budget refuses nothing.
        g.charge_work(ms(210), Duration::from_secs(5));
        assert!(!g.under_load(ms(1500)));
        assert_eq!(g.admit(v4(5), ms(1500), false), Admit::Process);
    }

    #[test]
    fn memory_is_bounded_idle_sources_make_room_and_busy_ones_are_kept() {
        let cfg = GateConfig {
            max_sources: 100,
            ..GateConfig::default()
        };
        let mut g = HandshakeGate::new(cfg, ms(0));
        for i in 0..100 {
            assert_eq!(g.admit(v4(i), ms(0), false), Admit::Process);
        }
        assert_eq!(g.sources(), 100);
        // Full of busy sources: a new one is refused, the known ones still work.
        assert_eq!(g.admit(v4(1000), ms(10), false), Admit::RateLimited);
        assert_eq!(g.admit(v4(5), ms(10), false), Admit::Process);
        assert_eq!(g.sources(), 100);
        // Within the sweep interval the table is not swept again.
        assert_eq!(g.admit(v4(1001), ms(500), false), Admit::RateLimited);
        // Once idle (both buckets full again: 1 token per 200 ms, 1/5 s), entries make room.
        assert_eq!(g.admit(v4(1002), ms(2000), false), Admit::Process);
        assert!(g.sources() <= 100);
        // Many new sources over a long time never grow the table past its bound.
        for i in 0..10_000u32 {
            let _ = g.admit(v4(10_000 + i), ms(2000 + u64::from(i) * 3), false);
            assert!(g.sources() <= 100);
        }
    }

    #[test]
    fn a_source_answered_with_a_cookie_takes_no_room() {
        // The caller asks cookie_required and answers with a cookie without calling admit:
        // the table only grows for admitted handshakes.
        let mut g = HandshakeGate::new(GateConfig::default(), ms(0));
        for _ in 0..200 {
            g.note_handshake(ms(0));
        }
        for i in 0..1000 {
            assert!(g.cookie_required(v4(i), ms(1)));
        }
        assert_eq!(g.sources(), 0);
    }
}

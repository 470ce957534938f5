//! Static key rotation: the rotating host's state machine and its crash recovery.
//!
//! WireGuard maps an allowed IP to exactly one public key, so a rotation is a cut-over: for a
//! moment the host runs one key and a peer routes the host's address to the other. The protocol
//! makes that moment as short as one handshake by preparing everything that can be prepared
//! while the old key still carries the traffic, then triggering both sides of the cut-over
//! with one coordinator event.
//!
//! # States of the rotating host
//!
//! ```text
//!  Idle ──write next──▶ NextKeyWritten ──prepare──▶ Prepared ──commit──▶ Committed
//!   ▲                                                                       │ switch
//!   └──────────────────────── promote (old key gone) ◀────── Switched ◀─────┘
//! ```
//!
//! - **Idle**: `private.key` holds the live key; no `private.key.next`.
//! - **NextKeyWritten**: a fresh key was generated on the host and written atomically to
//!   `private.key.next` (temp file, fsync, rename, directory fsync; mode 0600). The private
//!   half never leaves the host. The device still runs the current key.
//! - **Prepared**: the coordinator knows the next public key (`POST /v1/rotate/prepare`,
//!   idempotent). Every peer's netmap lists it as the host's `next_public_key`, and each peer
//!   adds it to its device as a peer *with no allowed IPs*: a handshake from the next key is
//!   accepted, but no traffic is routed to it yet. The old key still carries everything. The
//!   prepare's reply comes once every host that follows the coordinator has taken that netmap
//!   (its next long-poll says so), at most 3 s: the commit never outruns a peer's device.
//! - **Committed**: the coordinator made the next key the host's key (`POST /v1/rotate/commit`,
//!   sent through the tunnel that still runs the old key): the registry holds it with a new
//!   `key_created_unix`, every peer's netmap moves the host's allowed IPs to it and drops the
//!   old key. The coordinator's own interface keeps the old key for the join grace
//!   (`JOIN_KEY_GRACE`) so the reply gets back.
//! - **Switched**: on the reply, the host sets its device's private key to the next key and
//!   makes every peer handshake at once (a keepalive per peer). Peers that already moved
//!   accept the handshake (the key holds the allowed IPs); peers that did not move yet accept
//!   it too (Prepared put the key on their device) and route to it as soon as their netmap
//!   arrives. The cut-over therefore costs the gap between the commit's reply reaching the
//!   host and its long-poll netmap reaching each peer (both pushed by the same commit), plus
//!   one handshake.
//! - **Promote** (back to Idle): `private.key.next` is renamed over `private.key` (atomic; the
//!   old key disappears from disk with the rename) and the directory fsynced; the old
//!   `PrivateKey` is dropped, which zeroizes it.
//!
//! Why commit before switch: a commit sent *after* the switch would have to travel through a
//! tunnel keyed with the next key while the coordinator still routes the host's address to
//! the old key, so the call itself would be lost. Committing first and switching on the reply
//! uses the same grace the join already relies on.
//!
//! # The coordinator's own key
//!
//! The coordinator host runs the same machine against its registry in-process: prepare and
//! commit are registry writes, and the switch waits until the hosts that follow it took the
//! netmap with the new key (they reach the coordinator, API included, through that key; a host
//! that did not take the prepare in time is not waited for again). The commit also stores a
//! key notice per host (`crate::wire::notice`) so a host that missed it follows without the tunnel.
//!
//! # Requests, deferral and static peers
//!
//! A rotation starts from the schedule ([`rotation_due_unix`]), from `meshctl rotate`, or from
//! an admin's `meshctl rotate NAME`, which the coordinator puts into NAME's netmap
//! (`rotate_requested`) until NAME commits. When the coordinator does not answer, the
//! rotation is deferred: the next key stays on disk and the rotation resumes when the
//! coordinator answers again. A scheduled rotation is held while static peers (hand-written
//! wg-quick configurations) list the key; an operator's rotation goes ahead and names them.
//!
//! Per-pair preshared keys are not rotated along: the coordinator would have to hand them out
//! and so would know them all, which adds nothing against whoever controls it.
//!
//! # Crash recovery
//!
//! The key files are the durable state: `private.key` (current) and `private.key.next`
//! (pending), each replaced only by rename, so each is either absent or whole. At start
//! [`recover`] decides from the files plus the key the coordinator holds for us (from its
//! netmap; the cached netmap until the coordinator answers) which key is live. It never
//! answers "no key" while a file exists and never mixes: the device runs exactly one key.
//!
//! | files | coordinator holds | decision |
//! |---|---|---|
//! | none | – | generate (a fresh host) |
//! | current | any | current |
//! | current + next (same key) | any | current, delete next |
//! | current + next | current | current; resume the rotation at *prepare* |
//! | current + next | next | **promote** next, use it (crash after commit) |
//! | current + next | other / unknown | current, keep next, ask again when the coordinator answers |
//! | next only | any | promote next (the only key there is) |
//!
//! A crash in NextKeyWritten or Prepared resumes the same rotation (prepare is idempotent);
//! in Committed or Switched the coordinator already holds the next key, so it is promoted.
//! After a promote the old key exists nowhere, so no later crash can bring it back.
//!
//! The coordinator's word is the registry on the coordinator host, and on a member the key of
//! its cached netmap. That cache can lag: a member that died after the commit but before it
//! cached the reply decides `CurrentResume` and runs the old key, which nobody accepts any
//! more. So a member that starts with a next key on disk and cannot reach the coordinator
//! tries the next key once; if the coordinator answers through it and holds it, the rotation
//! is finished (promote), otherwise the old key is put back.

use crate::key::PublicKey;

/// Where the rotating host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    NextKeyWritten,
    Prepared,
    Committed,
    Switched,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Idle => "idle",
            Phase::NextKeyWritten => "next key written",
            Phase::Prepared => "prepared",
            Phase::Committed => "committed",
            Phase::Switched => "switched",
        })
    }
}

/// What the shell must do next for the rotation to progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Generate a key and write it to the next-key file (then `handle_next_key_written`).
    WriteNextKey,
    /// `POST /v1/rotate/prepare` with this key (then `handle_prepared`).
    Prepare(PublicKey),
    /// `POST /v1/rotate/commit` with this key (then `handle_committed`).
    Commit(PublicKey),
    /// Set the device's private key to the next key and handshake every peer (then
    /// `handle_switched`).
    Switch(PublicKey),
    /// Rename the next-key file over the current one and drop the old key (then
    /// `handle_promoted`).
    Promote,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::WriteNextKey => f.write_str("write the next key"),
            Action::Prepare(k) => write!(f, "prepare {}", k.short()),
            Action::Commit(k) => write!(f, "commit {}", k.short()),
            Action::Switch(k) => write!(f, "switch the device to {}", k.short()),
            Action::Promote => f.write_str("promote the next key file"),
        }
    }
}

/// An event that does not fit the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rotation event {event} does not fit phase {phase}")]
pub struct OutOfOrder {
    pub phase: Phase,
    pub event: &'static str,
}

/// The rotating host's state machine. Inputs are `handle_*`, the next step is `poll_action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    phase: Phase,
    current: PublicKey,
    next: Option<PublicKey>,
    requested: bool,
}

impl Rotation {
    /// Idle with `current` as the live key.
    pub fn idle(current: PublicKey) -> Self {
        Rotation {
            phase: Phase::Idle,
            current,
            next: None,
            requested: false,
        }
    }

    /// Resume a rotation whose next key is on disk (recovery said `resume`): it continues at
    /// prepare.
    pub fn resume(current: PublicKey, next: PublicKey) -> Self {
        Rotation {
            phase: Phase::NextKeyWritten,
            current,
            next: Some(next),
            requested: true,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The key the device runs (the next key from `Switched` on).
    pub fn live_key(&self) -> PublicKey {
        match (self.phase, self.next) {
            (Phase::Switched, Some(n)) => n,
            _ => self.current,
        }
    }

    pub fn next_key(&self) -> Option<PublicKey> {
        self.next
    }

    /// Ask for a rotation (schedule or `meshctl rotate`). Ignored while one is running.
    pub fn handle_request(&mut self) {
        if self.phase == Phase::Idle {
            self.requested = true;
        }
    }

    fn expect(&self, phase: Phase, event: &'static str) -> Result<(), OutOfOrder> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(OutOfOrder {
                phase: self.phase,
                event,
            })
        }
    }

    pub fn handle_next_key_written(&mut self, next: PublicKey) -> Result<(), OutOfOrder> {
        self.expect(Phase::Idle, "next key written")?;
        if !self.requested || next == self.current {
            return Err(OutOfOrder {
                phase: self.phase,
                event: "next key written",
            });
        }
        self.next = Some(next);
        self.phase = Phase::NextKeyWritten;
        Ok(())
    }

    pub fn handle_prepared(&mut self) -> Result<(), OutOfOrder> {
        self.expect(Phase::NextKeyWritten, "prepared")?;
        self.phase = Phase::Prepared;
        Ok(())
    }

    pub fn handle_committed(&mut self) -> Result<(), OutOfOrder> {
        self.expect(Phase::Prepared, "committed")?;
        self.phase = Phase::Committed;
        Ok(())
    }

    pub fn handle_switched(&mut self) -> Result<(), OutOfOrder> {
        self.expect(Phase::Committed, "switched")?;
        self.phase = Phase::Switched;
        Ok(())
    }

    /// The next key became the current one; back to Idle.
    pub fn handle_promoted(&mut self) -> Result<(), OutOfOrder> {
        self.expect(Phase::Switched, "promoted")?;
        if let Some(n) = self.next.take() {
            self.current = n;
        }
        self.phase = Phase::Idle;
        self.requested = false;
        Ok(())
    }

    /// The coordinator refused the prepare or the commit for good (not "unreachable"): the
    /// rotation is abandoned; the shell deletes the next-key file. Only possible before the
    /// commit; afterwards the coordinator holds the next key and the rotation must finish.
    pub fn handle_refused(&mut self) -> Result<(), OutOfOrder> {
        match self.phase {
            Phase::NextKeyWritten | Phase::Prepared => {
                self.phase = Phase::Idle;
                self.next = None;
                self.requested = false;
                Ok(())
            }
            phase => Err(OutOfOrder {
                phase,
                event: "refused",
            }),
        }
    }

    /// The next step, if any. Repeating a step after a failed attempt is safe: prepare and
    /// commit are idempotent on the coordinator, switch and promote on the host.
    pub fn poll_action(&self) -> Option<Action> {
        match (self.phase, self.next) {
            (Phase::Idle, _) if self.requested => Some(Action::WriteNextKey),
            (Phase::Idle, _) => None,
            (Phase::NextKeyWritten, Some(n)) => Some(Action::Prepare(n)),
            (Phase::Prepared, Some(n)) => Some(Action::Commit(n)),
            (Phase::Committed, Some(n)) => Some(Action::Switch(n)),
            (Phase::Switched, Some(_)) => Some(Action::Promote),
            (_, None) => None,
        }
    }
}

/// The public keys of the key files found at start (`None`: the file does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFiles {
    pub current: Option<PublicKey>,
    pub next: Option<PublicKey>,
}

/// What to do at start; see the table in the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No key file at all: generate one.
    Generate,
    /// Run the current key; nothing is pending.
    Current,
    /// Run the current key; the next-key file is stale (holds the current key): delete it.
    CurrentDiscardNext,
    /// Run the current key; the coordinator still holds it: resume the rotation at prepare.
    CurrentResume(PublicKey),
    /// Run the current key, keep the next-key file, and decide again once the coordinator
    /// says which key it holds.
    CurrentUndecided(PublicKey),
    /// Rename the next-key file over the current one and run it.
    PromoteNext,
}

impl Recovery {
    /// The key the device runs after this decision, given the files (`None` for `Generate`).
    pub fn live(&self, files: &KeyFiles) -> Option<PublicKey> {
        match self {
            Recovery::Generate => None,
            Recovery::PromoteNext => files.next,
            _ => files.current,
        }
    }
}

/// Decide which key is live from the key files and the key the coordinator holds for this
/// host (`None` when unknown: no coordinator, unreachable, or a static fleet).
pub fn recover(files: KeyFiles, coordinator: Option<PublicKey>) -> Recovery {
    match (files.current, files.next) {
        (None, None) => Recovery::Generate,
        (Some(_), None) => Recovery::Current,
        (None, Some(_)) => Recovery::PromoteNext,
        (Some(c), Some(n)) if c == n => Recovery::CurrentDiscardNext,
        (Some(c), Some(n)) => match coordinator {
            Some(k) if k == n => Recovery::PromoteNext,
            Some(k) if k == c => Recovery::CurrentResume(n),
            _ => Recovery::CurrentUndecided(n),
        },
    }
}

/// When a key created at `created_unix` is due for rotation under a period of `every_secs`
/// (`None`: never, for 0). The due time is early by a jitter of up to a tenth of the period,
/// derived from `seed` (the host's public key): hosts that joined together do not all rotate
/// in the same minute, and a host's due time does not move across restarts.
pub fn rotation_due_unix(created_unix: u64, every_secs: u64, seed: &PublicKey) -> Option<u64> {
    if every_secs == 0 {
        return None;
    }
    let window = every_secs / 10;
    let mixed = seed.0.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let jitter = if window == 0 { 0 } else { mixed % window };
    Some(created_unix.saturating_add(every_secs - jitter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    /// Run the state machine to the end, returning the actions in order.
    fn run(r: &mut Rotation, next: PublicKey) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(a) = r.poll_action() {
            actions.push(a);
            match a {
                Action::WriteNextKey => r.handle_next_key_written(next),
                Action::Prepare(_) => r.handle_prepared(),
                Action::Commit(_) => r.handle_committed(),
                Action::Switch(_) => r.handle_switched(),
                Action::Promote => r.handle_promoted(),
            }
            .expect("in order");
            assert!(actions.len() <= 5, "no loops: {actions:?}");
        }
        actions
    }

    #[test]
    fn a_rotation_walks_every_phase_once_and_ends_idle_on_the_new_key() {
        let mut r = Rotation::idle(k(1));
        assert_eq!(r.poll_action(), None, "nothing without a request");
        r.handle_request();
        let actions = run(&mut r, k(2));
        assert_eq!(
            actions,
            vec![
                Action::WriteNextKey,
                Action::Prepare(k(2)),
                Action::Commit(k(2)),
                Action::Switch(k(2)),
                Action::Promote
            ]
        );
        assert_eq!(r.phase(), Phase::Idle);
        assert_eq!(r.live_key(), k(2));
        assert_eq!(r.next_key(), None);
        assert_eq!(r.poll_action(), None, "one request, one rotation");
    }

    #[test]
    fn the_live_key_changes_only_at_the_switch() {
        let mut r = Rotation::idle(k(1));
        r.handle_request();
        r.handle_next_key_written(k(2)).expect("written");
        assert_eq!(r.live_key(), k(1));
        r.handle_prepared().expect("prepared");
        assert_eq!(r.live_key(), k(1));
        r.handle_committed().expect("committed");
        assert_eq!(r.live_key(), k(1), "the device switches on the reply");
        r.handle_switched().expect("switched");
        assert_eq!(r.live_key(), k(2));
    }

    #[test]
    fn out_of_order_events_are_refused_and_change_nothing() {
        let mut r = Rotation::idle(k(1));
        let before = r.clone();
        assert!(r.handle_next_key_written(k(2)).is_err(), "not requested");
        assert!(r.handle_prepared().is_err());
        assert!(r.handle_committed().is_err());
        assert!(r.handle_switched().is_err());
        assert!(r.handle_promoted().is_err());
        assert_eq!(r, before);
        r.handle_request();
        assert!(
            r.handle_next_key_written(k(1)).is_err(),
            "the next key must differ"
        );
        r.handle_next_key_written(k(2)).expect("written");
        assert!(r.handle_switched().is_err(), "no switch before the commit");
        r.handle_request();
        assert_eq!(
            r.phase(),
            Phase::NextKeyWritten,
            "a request mid-way is ignored"
        );
    }

    #[test]
    fn a_refusal_abandons_only_before_the_commit() {
        let mut r = Rotation::idle(k(1));
        r.handle_request();
        r.handle_next_key_written(k(2)).expect("written");
        r.handle_prepared().expect("prepared");
        r.handle_refused().expect("abandon");
        assert_eq!(
            (r.phase(), r.live_key(), r.poll_action()),
            (Phase::Idle, k(1), None)
        );
        let mut r = Rotation::resume(k(1), k(2));
        r.handle_prepared().expect("prepared");
        r.handle_committed().expect("committed");
        assert!(r.handle_refused().is_err(), "the coordinator holds the key");
        assert_eq!(r.poll_action(), Some(Action::Switch(k(2))));
    }

    #[test]
    fn a_resumed_rotation_continues_at_prepare() {
        let mut r = Rotation::resume(k(1), k(2));
        assert_eq!(r.poll_action(), Some(Action::Prepare(k(2))));
        let actions = run(&mut r, k(9));
        assert_eq!(actions.len(), 4);
        assert_eq!(r.live_key(), k(2));
    }

    #[test]
    fn recovery_table() {
        let f = |c: Option<u8>, n: Option<u8>| KeyFiles {
            current: c.map(k),
            next: n.map(k),
        };
        use Recovery::*;
        let c = |i: u8| Some(k(i));
        assert_eq!(recover(f(None, None), None), Generate);
        assert_eq!(recover(f(Some(1), None), c(7)), Current);
        assert_eq!(recover(f(Some(1), Some(1)), c(1)), CurrentDiscardNext);
        assert_eq!(recover(f(Some(1), Some(2)), c(1)), CurrentResume(k(2)));
        assert_eq!(recover(f(Some(1), Some(2)), c(2)), PromoteNext);
        assert_eq!(recover(f(Some(1), Some(2)), None), CurrentUndecided(k(2)));
        assert_eq!(recover(f(Some(1), Some(2)), c(3)), CurrentUndecided(k(2)));
        assert_eq!(recover(f(None, Some(2)), None), PromoteNext);
    }

    /// The phases a crash can happen in, with the files they leave behind and the key the
    /// coordinator then holds.
    fn crash_point(phase: Phase) -> (KeyFiles, PublicKey) {
        let (c, n) = (Some(k(1)), Some(k(2)));
        match phase {
            Phase::Idle => (
                KeyFiles {
                    current: c,
                    next: None,
                },
                k(1),
            ),
            Phase::NextKeyWritten | Phase::Prepared => (
                KeyFiles {
                    current: c,
                    next: n,
                },
                k(1),
            ),
            Phase::Committed | Phase::Switched => (
                KeyFiles {
                    current: c,
                    next: n,
                },
                k(2),
            ),
        }
    }

    proptest! {
        /// Whatever the files and the coordinator say, recovery names a key that is on disk
        /// (never none while a file exists) and, when the coordinator's key is on disk,
        /// exactly that one (never a mix with the peers).
        #[test]
        fn recovery_runs_an_existing_key_and_agrees_with_the_coordinator(
            c in proptest::option::of(0u8..4),
            n in proptest::option::of(0u8..4),
            coord in proptest::option::of(0u8..4),
        ) {
            let files = KeyFiles { current: c.map(k), next: n.map(k) };
            let r = recover(files, coord.map(k));
            let live = r.live(&files);
            if files.current.is_none() && files.next.is_none() {
                prop_assert_eq!(r, Recovery::Generate);
            } else {
                let live = live.expect("a key");
                prop_assert!(Some(live) == files.current || Some(live) == files.next);
                if let (Some(ck), Some(_)) = (coord.map(k), files.current) {
                    if Some(ck) == files.current || Some(ck) == files.next {
                        prop_assert_eq!(live, ck);
                    }
                }
            }
            // Deterministic.
            prop_assert_eq!(r, recover(files, coord.map(k)));
        }

        /// A crash in any phase recovers to the key the coordinator holds, and a resumed
        /// rotation finishes on the next key.
        #[test]
        fn a_crash_in_any_phase_recovers_to_the_coordinators_key(i in 0usize..5) {
            let phase = [Phase::Idle, Phase::NextKeyWritten, Phase::Prepared, Phase::Committed,
                Phase::Switched][i];
            let (files, coord) = crash_point(phase);
            let r = recover(files, Some(coord));
            prop_assert_eq!(r.live(&files), Some(coord));
            if let Recovery::CurrentResume(next) = r {
                let mut rot = Rotation::resume(coord, next);
                run(&mut rot, k(9));
                prop_assert_eq!(rot.live_key(), next);
            }
        }
    }

    #[test]
    fn the_schedule_is_within_the_last_tenth_of_the_period_and_stable() {
        const DAY: u64 = 86_400;
        assert_eq!(rotation_due_unix(1000, 0, &k(1)), None, "0 = never");
        let mut dues = std::collections::BTreeSet::new();
        for i in 0..50u8 {
            let due = rotation_due_unix(1000, 30 * DAY, &k(i)).expect("due");
            assert!(due > 1000 + 27 * DAY && due <= 1000 + 30 * DAY, "{due}");
            assert_eq!(Some(due), rotation_due_unix(1000, 30 * DAY, &k(i)));
            dues.insert(due);
        }
        assert!(
            dues.len() > 40,
            "the jitter spreads hosts out: {}",
            dues.len()
        );
        assert_eq!(
            rotation_due_unix(u64::MAX - 5, 30 * DAY, &k(1)),
            Some(u64::MAX)
        );
    }
}

//! Tests of counting semaphores: creation, acquire and release, the fair priority queue (no
//! barging, aging bound), wait deadlines, lease ends, and a model-checked property test. Every
//! test checks the response and the state it leaves behind; every apply is followed by the
//! structural invariant check.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The queue order the module docs promise: virtual arrival, then arrival order.
fn waiter_key(w: &SemWaiter) -> (i128, u64) {
    virtual_arrival(w.since_ms, w.priority, w.seq)
}

fn virtual_arrival(since_ms: u64, priority: u64, seq: u64) -> (i128, u64) {
    (
        i128::from(since_ms) - i128::from(priority) * i128::from(AGING_MS),
        seq,
    )
}

/// `check_invariants` plus what only holds right after an apply: nothing live is past its
/// deadline, the lease -> semaphore-wait links agree, holders and waiters are well formed and
/// from the past, queues are sorted, and `next_deadline` sees every deadline.
pub(super) fn deep_check(sm: &Sm) -> Result<(), String> {
    sm.check_invariants()?;
    for (id, l) in &sm.leases {
        if l.deadline_ms <= sm.time_ms {
            return Err(format!("lease {id} is live past its deadline"));
        }
        for name in &l.sem_waiting {
            let queued = sm
                .semaphores
                .get(name)
                .is_some_and(|s| s.queue.iter().any(|w| w.lease_id == *id));
            if !queued {
                return Err(format!("lease {id} claims to wait on semaphore {name}"));
            }
            if l.sems.contains(name) {
                return Err(format!(
                    "lease {id} both holds and waits on semaphore {name}"
                ));
            }
        }
    }
    for (name, s) in &sm.semaphores {
        if !(1..=MAX_CAPACITY).contains(&s.capacity) {
            return Err(format!("semaphore {name} has capacity {}", s.capacity));
        }
        if s.used() > s.capacity {
            return Err(format!("semaphore {name} over capacity"));
        }
        for (id, hd) in &s.holders {
            if hd.permits == 0 || hd.permits > s.capacity {
                return Err(format!("holder {id} of {name} has {} permits", hd.permits));
            }
            if hd.token > sm.index || hd.token <= *id || hd.since_ms > sm.time_ms {
                return Err(format!("holder {id} of {name} is malformed: {hd:?}"));
            }
        }
        let mut seen = BTreeSet::new();
        for w in &s.queue {
            if !seen.insert(w.lease_id) {
                return Err(format!("lease {} queued twice on {name}", w.lease_id));
            }
            if s.holders.contains_key(&w.lease_id) {
                return Err(format!("holder {} of {name} also queued", w.lease_id));
            }
            let malformed = w.permits == 0
                || w.permits > s.capacity
                || w.priority > MAX_PRIORITY
                || w.since_ms > sm.time_ms
                || w.deadline_ms <= sm.time_ms
                || w.deadline_ms - w.since_ms > MAX_WAIT_MS
                || w.seq > sm.index
                || w.seq <= w.lease_id;
            if malformed {
                return Err(format!("waiter on {name} is malformed: {w:?}"));
            }
        }
        for pair in s.queue.windows(2) {
            if waiter_key(&pair[0]) >= waiter_key(&pair[1]) {
                return Err(format!("queue of {name} out of order: {pair:?}"));
            }
        }
    }
    super::harness::check_next_deadline(sm)
}

/// A state machine plus the next log index and the leader term of the next entry; every apply
/// is checked.
struct H {
    sm: Sm,
    index: u64,
    term: u64,
}

impl H {
    fn new() -> H {
        H {
            sm: Sm::new(),
            index: 0,
            term: 1,
        }
    }

    fn apply_req(&mut self, time_ms: u64, request_id: Option<&str>, cmd: Command) -> Response {
        self.index += 1;
        let entry = LogEntry {
            time_ms,
            request_id: request_id.map(str::to_string),
            cmd,
        };
        let r = self.sm.apply(self.index, self.term, &entry);
        if let Err(e) = deep_check(&self.sm) {
            panic!("invariant broken by {entry:?} at index {}: {e}", self.index);
        }
        assert_eq!(self.sm.index, self.index);
        r
    }

    fn apply(&mut self, time_ms: u64, cmd: Command) -> Response {
        self.apply_req(time_ms, None, cmd)
    }

    /// Apply a tick; returns its index.
    fn tick(&mut self, time_ms: u64) -> u64 {
        assert_eq!(self.apply(time_ms, Command::Tick), Response::Done);
        self.index
    }

    fn grant(&mut self, time_ms: u64, ttl_ms: u64) -> u64 {
        let r = self.apply(
            time_ms,
            Command::LeaseGrant {
                ttl_ms,
                owner: None,
            },
        );
        assert_eq!(
            r,
            Response::LeaseGranted {
                lease_id: self.index,
                ttl_ms
            }
        );
        self.index
    }

    fn revoke(&mut self, time_ms: u64, lease_id: u64) -> u64 {
        let r = self.apply(time_ms, Command::LeaseRevoke { lease_id });
        assert_eq!(r, Response::LeaseRevoked { lease_id });
        self.index
    }

    fn create(&mut self, time_ms: u64, name: &str, capacity: u64) -> Response {
        self.apply(
            time_ms,
            Command::SemCreate {
                name: name.into(),
                capacity,
            },
        )
    }

    fn new_sem(&mut self, time_ms: u64, name: &str, capacity: u64) {
        let r = self.create(time_ms, name, capacity);
        assert_eq!(
            r,
            Response::SemCreated {
                capacity,
                created: true
            }
        );
    }

    fn acquire(
        &mut self,
        time_ms: u64,
        name: &str,
        lease_id: u64,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    ) -> Response {
        self.apply(
            time_ms,
            Command::SemAcquire {
                name: name.into(),
                lease_id,
                permits,
                wait_ms,
                priority,
            },
        )
    }

    /// Acquire permits that are free and check the token is this entry's index.
    fn take(&mut self, time_ms: u64, name: &str, lease_id: u64, permits: u64) -> u64 {
        let r = self.acquire(time_ms, name, lease_id, permits, 0, 0);
        assert_eq!(r, Response::SemGranted { token: self.index });
        self.index
    }

    /// Queue for permits; returns the position.
    fn wait(
        &mut self,
        time_ms: u64,
        name: &str,
        lease_id: u64,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    ) -> u64 {
        match self.acquire(time_ms, name, lease_id, permits, wait_ms, priority) {
            Response::SemQueued { position } => position,
            other => panic!("expected SemQueued, got {other:?}"),
        }
    }

    fn release(&mut self, time_ms: u64, name: &str, lease_id: u64) -> Response {
        self.apply(
            time_ms,
            Command::SemRelease {
                name: name.into(),
                lease_id,
            },
        )
    }

    fn lock_acquire(&mut self, time_ms: u64, name: &str, lease_id: u64, wait_ms: u64) -> Response {
        self.apply(
            time_ms,
            Command::LockAcquire {
                name: name.into(),
                lease_id,
                wait_ms,
                mode: LockMode::Exclusive,
            },
        )
    }

    fn lock_release(&mut self, time_ms: u64, name: &str, lease_id: u64) -> Response {
        self.apply(
            time_ms,
            Command::LockRelease {
                name: name.into(),
                lease_id,
            },
        )
    }

    /// (lease, permits, token) of every holder, by lease id.
    fn holders(&self, name: &str) -> Vec<(u64, u64, u64)> {
        self.sm.semaphores[name]
            .holders
            .iter()
            .map(|(id, hd)| (*id, hd.permits, hd.token))
            .collect()
    }

    fn queue(&self, name: &str) -> Vec<u64> {
        self.sm.semaphores[name]
            .queue
            .iter()
            .map(|w| w.lease_id)
            .collect()
    }

    fn free(&self, name: &str) -> u64 {
        self.sm.semaphores[name].free()
    }

    fn sems_of(&self, lease_id: u64) -> Vec<&str> {
        self.sm.leases[&lease_id]
            .sems
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn waits_of(&self, lease_id: u64) -> Vec<&str> {
        self.sm.leases[&lease_id]
            .sem_waiting
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn lock_holder(&self, name: &str) -> Option<(u64, u64)> {
        self.sm
            .locks
            .get(name)
            .and_then(|l| l.holder.as_ref())
            .map(|hd| (hd.lease_id, hd.token))
    }
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Rejected(rej) => rej.code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// `after` is `before` with only the clock, the applied index and the term moved.
fn assert_unchanged(before: &Sm, after: &Sm) {
    let mut expected = before.clone();
    expected.index = after.index;
    expected.time_ms = after.time_ms;
    expected.term = after.term;
    assert_eq!(&expected, after, "a rejected command changed the state");
}

/// Three leases with long TTLs (ids 1, 2, 3) and `S` created with `capacity` at index 4.
fn setup(capacity: u64) -> (H, u64, u64, u64) {
    let mut h = H::new();
    let a = h.grant(0, 100_000);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    h.new_sem(0, "S", capacity);
    (h, a, b, c)
}

// ---------------------------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------------------------

#[test]
fn create_rejects_capacity_out_of_bounds_and_an_empty_name() {
    let mut h = H::new();
    for capacity in [0, MAX_CAPACITY + 1, u64::MAX] {
        let before = h.sm.clone();
        let r = h.create(1, "S", capacity);
        assert_eq!(code(&r), ErrorCode::InvalidArgument, "capacity {capacity}");
        assert_unchanged(&before, &h.sm);
    }
    let before = h.sm.clone();
    assert_eq!(code(&h.create(1, "", 3)), ErrorCode::InvalidArgument);
    assert_unchanged(&before, &h.sm);
    assert!(h.sm.semaphores.is_empty());

    // Both bounds are inclusive.
    h.new_sem(2, "one", 1);
    h.new_sem(2, "max", MAX_CAPACITY);
    assert_eq!(
        h.sm.semaphores.keys().collect::<Vec<_>>(),
        vec!["max", "one"]
    );
    let s = &h.sm.semaphores["max"];
    assert_eq!(s.capacity, MAX_CAPACITY);
    assert!(s.holders.is_empty() && s.queue.is_empty());
    assert_eq!(h.free("one"), 1);
}

#[test]
fn create_is_idempotent_with_the_same_capacity_and_conflicts_with_another() {
    let (mut h, a, b, _) = setup(3);
    let t = h.take(1, "S", a, 2);
    h.wait(1, "S", b, 2, 10_000, 0);

    let before = h.sm.clone();
    assert_eq!(
        h.create(2, "S", 3),
        Response::SemCreated {
            capacity: 3,
            created: false
        }
    );
    assert_unchanged(&before, &h.sm);

    for capacity in [1, 2, 4] {
        let before = h.sm.clone();
        assert_eq!(code(&h.create(3, "S", capacity)), ErrorCode::Conflict);
        assert_unchanged(&before, &h.sm);
    }
    // The bounds are checked before the conflict.
    assert_eq!(code(&h.create(3, "S", 0)), ErrorCode::InvalidArgument);

    assert_eq!(h.sm.semaphores["S"].capacity, 3);
    assert_eq!(h.holders("S"), vec![(a, 2, t)]);
    assert_eq!(h.queue("S"), vec![b]);
}

// ---------------------------------------------------------------------------------------------
// Acquire
// ---------------------------------------------------------------------------------------------

#[test]
fn acquire_rejects_unknown_semaphores_bad_arguments_and_unknown_leases() {
    let (mut h, a, _, _) = setup(3);
    let short = h.grant(0, MIN_TTL_MS);
    h.tick(MIN_TTL_MS);
    assert!(!h.sm.leases.contains_key(&short));

    let cases: Vec<(&str, u64, u64, u64, u64, ErrorCode)> = vec![
        // (name, lease, permits, wait_ms, priority, code)
        ("nope", a, 1, 0, 0, ErrorCode::NotFound),
        ("", a, 1, 0, 0, ErrorCode::NotFound),
        ("s", a, 1, 0, 0, ErrorCode::NotFound),
        ("S", a, 0, 0, 0, ErrorCode::InvalidArgument),
        ("S", a, 4, 1_000, 0, ErrorCode::InvalidArgument),
        ("S", a, u64::MAX, 0, 0, ErrorCode::InvalidArgument),
        ("S", a, 1, 0, MAX_PRIORITY + 1, ErrorCode::InvalidArgument),
        ("S", a, 1, 1_000, u64::MAX, ErrorCode::InvalidArgument),
        ("S", a, 1, MAX_WAIT_MS + 1, 0, ErrorCode::InvalidArgument),
        ("S", 999, 1, 0, 0, ErrorCode::LeaseNotFound),
        ("S", short, 1, 1_000, 0, ErrorCode::LeaseNotFound),
        // An unknown semaphore is reported before an unknown lease.
        ("nope", 999, 1, 0, 0, ErrorCode::NotFound),
    ];
    for (name, lease, permits, wait_ms, priority, want) in cases {
        let before = h.sm.clone();
        let r = h.acquire(MIN_TTL_MS + 1, name, lease, permits, wait_ms, priority);
        assert_eq!(
            code(&r),
            want,
            "{name} {lease} {permits} {wait_ms} {priority}"
        );
        assert_unchanged(&before, &h.sm);
    }
    assert!(h.holders("S").is_empty() && h.queue("S").is_empty());
    assert!(h.sm.leases[&a].sems.is_empty());

    // The upper bounds are inclusive.
    let t = h.index + 1;
    assert_eq!(
        h.acquire(MIN_TTL_MS + 2, "S", a, 3, MAX_WAIT_MS, MAX_PRIORITY),
        Response::SemGranted { token: t }
    );
    assert_eq!(h.holders("S"), vec![(a, 3, t)]);
}

#[test]
fn grant_token_is_the_entry_index_and_permits_never_exceed_capacity() {
    let (mut h, a, b, c) = setup(5);
    let ta = h.take(10, "S", a, 2);
    assert_eq!(ta, 5);
    assert_eq!(h.free("S"), 3);
    let tb = h.take(20, "S", b, 3);
    assert_eq!(tb, 6);
    assert_eq!(h.free("S"), 0);
    assert_eq!(h.holders("S"), vec![(a, 2, ta), (b, 3, tb)]);
    let s = &h.sm.semaphores["S"];
    assert_eq!((s.holders[&a].since_ms, s.holders[&b].since_ms), (10, 20));
    assert_eq!(s.used(), 5);
    assert_eq!(h.sems_of(a), vec!["S"]);
    assert_eq!(h.sems_of(b), vec!["S"]);

    // Full: even one permit is refused.
    let before = h.sm.clone();
    assert_eq!(
        code(&h.acquire(30, "S", c, 1, 0, MAX_PRIORITY)),
        ErrorCode::LockHeld
    );
    assert_unchanged(&before, &h.sm);
    assert!(h.sm.leases[&c].sems.is_empty());
}

#[test]
fn reacquire_by_a_holder_is_idempotent_with_the_same_permits_and_conflict_otherwise() {
    let (mut h, a, _, _) = setup(4);
    let t = h.take(1, "S", a, 2);

    for (wait_ms, priority) in [(0, 0), (5_000, 9)] {
        let before = h.sm.clone();
        assert_eq!(
            h.acquire(2, "S", a, 2, wait_ms, priority),
            Response::SemGranted { token: t }
        );
        assert_unchanged(&before, &h.sm);
    }
    for permits in [1, 3, 4] {
        let before = h.sm.clone();
        assert_eq!(
            code(&h.acquire(3, "S", a, permits, 5_000, 0)),
            ErrorCode::Conflict
        );
        assert_unchanged(&before, &h.sm);
    }
    assert_eq!(h.holders("S"), vec![(a, 2, t)]);
    assert!(h.queue("S").is_empty());
}

#[test]
fn try_acquire_without_enough_free_permits_is_lock_held_and_does_not_queue() {
    let (mut h, a, b, _) = setup(3);
    h.take(1, "S", a, 2);
    let before = h.sm.clone();
    let r = h.acquire(2, "S", b, 2, 0, MAX_PRIORITY);
    assert_eq!(code(&r), ErrorCode::LockHeld);
    assert_unchanged(&before, &h.sm);
    assert!(h.queue("S").is_empty());
    assert!(h.sm.leases[&b].sem_waiting.is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());

    // What does fit is granted by a try.
    let t = h.take(3, "S", b, 1);
    assert_eq!(h.holders("S"), vec![(a, 2, 5), (b, 1, t)]);
}

#[test]
fn waiters_are_queued_with_their_position_deadline_and_arrival() {
    let mut h = H::new();
    let a = h.grant(0, 100_000);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    let d = h.grant(0, 100_000);
    h.new_sem(0, "S", 2);
    h.take(0, "S", a, 2);

    assert_eq!(h.wait(100, "S", b, 1, 5_000, 0), 1);
    let b_seq = h.index;
    assert_eq!(h.wait(200, "S", c, 2, 1_000, 0), 2);
    assert_eq!(h.wait(300, "S", d, 1, 9_000, 0), 3);
    assert_eq!(h.queue("S"), vec![b, c, d]);

    let w = &h.sm.semaphores["S"].queue[0];
    assert_eq!(
        (
            w.lease_id,
            w.permits,
            w.priority,
            w.since_ms,
            w.deadline_ms,
            w.seq
        ),
        (b, 1, 0, 100, 5_100, b_seq)
    );
    assert_eq!(h.waits_of(b), vec!["S"]);
    assert!(h.sm.leases[&b].sems.is_empty());
    let expiry: Vec<_> = h.sm.sem_wait_expiry.iter().cloned().collect();
    assert_eq!(
        expiry,
        vec![
            (1_200, "S".to_string(), c),
            (5_100, "S".to_string(), b),
            (9_300, "S".to_string(), d),
        ]
    );
    assert_eq!(h.sm.next_deadline(), Some(1_200));

    // Asking again while queued reports the position and changes nothing.
    for (lease, position) in [(b, 1), (c, 2), (d, 3)] {
        let before = h.sm.clone();
        let permits = h.sm.semaphores["S"].queue[position as usize - 1].permits;
        assert_eq!(
            h.acquire(400, "S", lease, permits, 60_000, 0),
            Response::SemQueued { position }
        );
        assert_unchanged(&before, &h.sm);
    }
}

#[test]
fn no_barging_a_request_that_fits_queues_behind_a_waiter_that_does_not() {
    let (mut h, a, b, c) = setup(4);
    h.take(1, "S", a, 3);
    assert_eq!(h.wait(2, "S", b, 2, 60_000, 0), 1);
    assert_eq!(h.free("S"), 1);

    // c's one permit would fit, but b is ahead of it.
    assert_eq!(h.wait(3, "S", c, 1, 60_000, 0), 2);
    assert_eq!(h.queue("S"), vec![b, c]);
    assert_eq!(h.holders("S").len(), 1);
    assert_eq!(h.free("S"), 1);
    assert!(h.sm.leases[&c].sems.is_empty());

    // Nor does a try barge.
    let d = h.grant(4, 100_000);
    let before = h.sm.clone();
    assert_eq!(code(&h.acquire(5, "S", d, 1, 0, 0)), ErrorCode::LockHeld);
    assert_unchanged(&before, &h.sm);

    // When a releases, both are granted in queue order, by the releasing entry.
    let r = h.release(6, "S", a);
    let idx = h.index;
    assert_eq!(
        r,
        Response::SemReleased {
            granted: vec![b, c]
        }
    );
    assert_eq!(h.holders("S"), vec![(b, 2, idx), (c, 1, idx)]);
    assert!(h.queue("S").is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());
    assert!(h.sm.leases[&a].sems.is_empty());
    assert_eq!(h.sems_of(b), vec!["S"]);
    assert!(h.sm.leases[&b].sem_waiting.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Release and hand-off
// ---------------------------------------------------------------------------------------------

#[test]
fn release_hands_off_to_the_head_with_the_releasing_entrys_index() {
    let (mut h, a, b, _) = setup(2);
    h.take(1, "S", a, 2);
    h.wait(2, "S", b, 2, 60_000, 0);
    let r = h.release(3, "S", a);
    let idx = h.index;
    assert_eq!(r, Response::SemReleased { granted: vec![b] });
    assert_eq!(h.holders("S"), vec![(b, 2, idx)]);
    assert_eq!(h.sm.semaphores["S"].holders[&b].since_ms, 3);
    assert!(h.sm.leases[&a].sems.is_empty());
    assert_eq!(h.sems_of(b), vec!["S"]);
    assert!(h.sm.leases[&b].sem_waiting.is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());

    // A release with nobody waiting grants nothing and leaves the semaphore in place.
    assert_eq!(
        h.release(4, "S", b),
        Response::SemReleased { granted: vec![] }
    );
    assert!(h.holders("S").is_empty());
    assert_eq!(h.sm.semaphores["S"].capacity, 2);
    // The permits can be taken again, with a new token.
    let t = h.take(5, "S", a, 1);
    assert!(t > idx);
}

#[test]
fn release_grants_several_small_waiters_in_one_step_and_a_head_that_does_not_fit_blocks() {
    let mut h = H::new();
    let ids: Vec<u64> = (0..5).map(|_| h.grant(0, 100_000)).collect();
    let (a, b, c, d, e) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    h.new_sem(0, "S", 3);
    h.take(1, "S", a, 3);
    assert_eq!(h.wait(2, "S", b, 1, 60_000, 0), 1);
    assert_eq!(h.wait(3, "S", c, 1, 60_000, 0), 2);
    assert_eq!(h.wait(4, "S", d, 2, 60_000, 0), 3);
    assert_eq!(h.wait(5, "S", e, 1, 60_000, 0), 4);

    // b and c fit; d does not fit in the one permit left, so e (which would) waits too.
    let r = h.release(6, "S", a);
    let i1 = h.index;
    assert_eq!(
        r,
        Response::SemReleased {
            granted: vec![b, c]
        }
    );
    assert_eq!(h.holders("S"), vec![(b, 1, i1), (c, 1, i1)]);
    assert_eq!(h.queue("S"), vec![d, e]);
    assert_eq!(h.free("S"), 1);

    let r = h.release(7, "S", b);
    let i2 = h.index;
    assert_eq!(r, Response::SemReleased { granted: vec![d] });
    assert_eq!(h.holders("S"), vec![(c, 1, i1), (d, 2, i2)]);
    assert_eq!(h.queue("S"), vec![e]);

    let r = h.release(8, "S", c);
    let i3 = h.index;
    assert_eq!(r, Response::SemReleased { granted: vec![e] });
    assert_eq!(h.holders("S"), vec![(d, 2, i2), (e, 1, i3)]);
    assert!(h.queue("S").is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());
}

#[test]
fn releasing_by_a_lease_that_holds_nothing_is_conflict_and_changes_nothing() {
    let (mut h, a, b, c) = setup(2);
    h.take(1, "S", a, 2);
    h.wait(2, "S", b, 1, 60_000, 0);
    h.new_sem(3, "T", 1);

    // (name, lease, code): a waiter, a lease with nothing, a holder of another semaphore, a
    // semaphore that does not exist, a lease that does not exist.
    let cases = [
        ("S", b, ErrorCode::Conflict),
        ("S", c, ErrorCode::Conflict),
        ("T", a, ErrorCode::Conflict),
        ("nope", a, ErrorCode::Conflict),
        ("S", 999, ErrorCode::LeaseNotFound),
    ];
    for (name, lease, want) in cases {
        let before = h.sm.clone();
        assert_eq!(code(&h.release(4, name, lease)), want, "{name} {lease}");
        assert_unchanged(&before, &h.sm);
    }
    assert_eq!(h.holders("S"), vec![(a, 2, 5)]);
    assert_eq!(h.queue("S"), vec![b]);
    assert_eq!(h.waits_of(b), vec!["S"]);
}

// ---------------------------------------------------------------------------------------------
// Priority and aging
// ---------------------------------------------------------------------------------------------

#[test]
fn higher_priority_is_served_first_and_equal_priority_in_arrival_order() {
    let mut h = H::new();
    let ids: Vec<u64> = (0..5).map(|_| h.grant(0, 100_000)).collect();
    let (a, b, c, d, e) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    h.new_sem(0, "S", 1);
    h.take(0, "S", a, 1);
    assert_eq!(h.wait(100, "S", b, 1, 60_000, 0), 1);
    assert_eq!(h.wait(200, "S", c, 1, 60_000, 5), 1);
    assert_eq!(h.wait(300, "S", d, 1, 60_000, 5), 2);
    assert_eq!(h.wait(400, "S", e, 1, 60_000, MAX_PRIORITY), 1);
    assert_eq!(h.queue("S"), vec![e, c, d, b]);

    let mut holder = a;
    for (t, next) in [(500, e), (600, c), (700, d), (800, b)] {
        let r = h.release(t, "S", holder);
        assert_eq!(
            r,
            Response::SemReleased {
                granted: vec![next]
            }
        );
        assert_eq!(h.holders("S"), vec![(next, 1, h.index)]);
        holder = next;
    }
    assert!(h.queue("S").is_empty());
}

#[test]
fn a_priority_zero_waiter_is_not_passed_by_a_priority_nine_waiter_arriving_9_aging_later() {
    let lead = MAX_PRIORITY * AGING_MS;
    // (gap after b's arrival, does c pass b?)
    for (gap, passes) in [
        (0, true),
        (lead - 1, true),
        (lead, false),
        (lead + 1, false),
    ] {
        let (mut h, a, b, c) = setup(1);
        h.take(1_000, "S", a, 1);
        assert_eq!(h.wait(1_000, "S", b, 1, 60_000, 0), 1);
        let position = h.wait(1_000 + gap, "S", c, 1, 60_000, MAX_PRIORITY);
        let order = if passes { vec![c, b] } else { vec![b, c] };
        assert_eq!(position, if passes { 1 } else { 2 }, "gap {gap}");
        assert_eq!(h.queue("S"), order, "gap {gap}");
        let r = h.release(1_000 + gap, "S", a);
        assert_eq!(
            r,
            Response::SemReleased {
                granted: vec![order[0]]
            }
        );
        assert_eq!(h.queue("S"), vec![order[1]]);
    }
}

#[test]
fn aging_bound_holds_for_every_pair_of_priorities() {
    for p in 0..=MAX_PRIORITY {
        for q in p + 1..=MAX_PRIORITY {
            let lead = (q - p) * AGING_MS;
            for (gap, passes) in [(lead - 1, true), (lead, false), (lead + 1, false)] {
                let (mut h, a, b, c) = setup(1);
                h.take(0, "S", a, 1);
                h.wait(500, "S", b, 1, 60_000, p);
                let position = h.wait(500 + gap, "S", c, 1, 60_000, q);
                assert_eq!(
                    position,
                    if passes { 1 } else { 2 },
                    "p {p} q {q} gap {gap}"
                );
                // A lower priority that arrives later never passes.
                let d = h.grant(500 + gap, 100_000);
                let last = h.wait(500 + gap, "S", d, 1, 60_000, p);
                assert_eq!(last, 3, "p {p} q {q} gap {gap}");
            }
        }
    }
}

/// Capacity 3: `a` holds 2, `b` waits for 2 at priority 0 (it does not fit in the one free
/// permit). `c` asks for 1 at priority 9: its virtual arrival is 9 s before `b`'s, so it is the
/// new head, and it fits. By the module's policy (grant from the head while the head fits) and
/// its invariant (a non-empty queue's head does not fit), it must be granted by this entry.
/// `sem_acquire` only grants when the queue is empty, so `c` is queued at position 1 with a
/// permit free for it, and `check_invariants` fails ("head waiter fits but was not granted").
#[test]
fn a_higher_priority_request_that_fits_ahead_of_a_blocked_head_is_granted_at_once() {
    let (mut h, a, b, c) = setup(3);
    h.take(0, "S", a, 2);
    assert_eq!(h.wait(0, "S", b, 2, 60_000, 0), 1);
    let r = h.acquire(100, "S", c, 1, 60_000, MAX_PRIORITY);
    let idx = h.index;
    assert_eq!(r, Response::SemGranted { token: idx });
    assert_eq!(h.holders("S"), vec![(a, 2, 5), (c, 1, idx)]);
    assert_eq!(h.queue("S"), vec![b]);
    assert!(h.sm.leases[&c].sem_waiting.is_empty());
    // b is still blocked until a releases.
    assert_eq!(
        h.release(200, "S", c),
        Response::SemReleased { granted: vec![] }
    );
    assert_eq!(
        h.release(300, "S", a),
        Response::SemReleased { granted: vec![b] }
    );
}

/// The same situation as a try (`wait_ms` 0): the request would be the head and fits, so the
/// policy grants it rather than answering `lock_held`.
#[test]
fn a_higher_priority_try_that_fits_ahead_of_a_blocked_head_is_granted() {
    let (mut h, a, b, c) = setup(3);
    h.take(0, "S", a, 2);
    h.wait(0, "S", b, 2, 60_000, 0);
    let r = h.acquire(100, "S", c, 1, 0, MAX_PRIORITY);
    assert_eq!(r, Response::SemGranted { token: h.index });
    assert_eq!(h.queue("S"), vec![b]);
    // A try that would not be the head is still refused.
    let d = h.grant(100, 100_000);
    assert_eq!(code(&h.acquire(100, "S", d, 1, 0, 0)), ErrorCode::LockHeld);
}

// ---------------------------------------------------------------------------------------------
// Wait deadlines
// ---------------------------------------------------------------------------------------------

#[test]
fn a_waiter_is_removed_at_its_deadline_and_the_ones_behind_it_that_fit_are_granted() {
    let mut h = H::new();
    let ids: Vec<u64> = (0..4).map(|_| h.grant(0, 100_000)).collect();
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    h.new_sem(0, "S", 4);
    let ta = h.take(0, "S", a, 2);
    assert_eq!(h.wait(100, "S", b, 3, 500, 0), 1);
    assert_eq!(h.wait(200, "S", c, 1, 10_000, 0), 2);
    assert_eq!(h.wait(300, "S", d, 1, 10_000, 0), 3);
    assert_eq!(h.sm.next_deadline(), Some(600));

    h.tick(599);
    assert_eq!(h.queue("S"), vec![b, c, d]);
    assert!(h.holders("S").len() == 1);

    let tick = h.tick(600);
    assert_eq!(h.holders("S"), vec![(a, 2, ta), (c, 1, tick), (d, 1, tick)]);
    assert!(h.queue("S").is_empty());
    assert!(h.sm.leases[&b].sem_waiting.is_empty() && h.sm.leases[&b].sems.is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());
    assert_eq!(h.sems_of(c), vec!["S"]);
    assert!(h.sm.leases[&c].sem_waiting.is_empty());
    assert_eq!(h.sm.next_deadline(), Some(100_000));

    // The timed-out waiter is not granted later.
    assert_eq!(
        h.release(700, "S", a),
        Response::SemReleased { granted: vec![] }
    );
    assert!(h.sm.leases[&b].sems.is_empty());
}

/// The event is what wakes the blocked HTTP acquire, which then answers `timeout`.
#[test]
fn a_wait_that_reaches_its_deadline_emits_wait_expired_naming_the_lease() {
    let (mut h, a, b, _) = setup(2);
    h.take(0, "S", a, 2);
    h.wait(0, "S", b, 1, 1_000, 0);
    h.sm.take_events();
    h.tick(1_000);
    let events = h.sm.take_events_of("semaphore");
    assert!(
        events
            .iter()
            .any(|e| e.name == "S" && e.action == "wait_expired" && e.detail["lease_id"] == b),
        "{events:?}"
    );
}

#[test]
fn a_wait_deadline_passed_before_any_entry_is_handled_by_the_next_one() {
    let (mut h, a, b, c) = setup(2);
    h.take(0, "S", a, 1);
    h.wait(0, "S", b, 2, 1_000, 0);
    h.wait(0, "S", c, 1, 60_000, 0);
    // The next entry comes long after b's deadline; expiry runs before the command.
    let r = h.release(5_000, "S", a);
    let idx = h.index;
    // b is gone before the release; c was granted when b left (by this same entry), so the
    // release itself grants nobody.
    assert_eq!(r, Response::SemReleased { granted: vec![] });
    assert_eq!(h.holders("S"), vec![(c, 1, idx)]);
    assert!(h.queue("S").is_empty());
}

/// Expiry runs in deadline order: b's wait ends at 1_000, a's lease at 2_000, with no entry in
/// between. The wait must end first, or b would be granted permits it gave up on.
#[test]
fn a_waiter_that_timed_out_is_not_granted_when_the_holder_expires_later() {
    let mut h = H::new();
    let a = h.grant(0, 2_000);
    let b = h.grant(0, 100_000);
    h.new_sem(0, "S", 1);
    h.take(0, "S", a, 1);
    h.wait(0, "S", b, 1, 1_000, 0);
    h.tick(2_000);
    assert!(!h.sm.leases.contains_key(&a));
    assert!(h.holders("S").is_empty());
    assert!(h.queue("S").is_empty());
    assert!(h.sm.leases[&b].sems.is_empty());
}

/// A wait and a lease ending at the same time: the wait ends first.
#[test]
fn a_wait_ending_with_the_holders_lease_ends_first() {
    let mut h = H::new();
    let a = h.grant(0, 2_000);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    h.new_sem(0, "S", 1);
    h.take(0, "S", a, 1);
    h.wait(0, "S", b, 1, 2_000, 0);
    h.wait(0, "S", c, 1, 60_000, 0);
    let tick = h.tick(2_000);
    assert_eq!(h.holders("S"), vec![(c, 1, tick)]);
    assert!(h.queue("S").is_empty());
    assert!(h.sm.leases[&b].sems.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Lease end
// ---------------------------------------------------------------------------------------------

/// `a` holds 2 of `S` and waits (as the blocked head) on `T`; `b` and `c` wait on `S`, `y`
/// waits behind `a` on `T`. Ending `a` hands `S` to `b` and `c`, and `T` to `y`, in that step.
const T_TOKEN: u64 = 9;

fn lease_end_setup(a_ttl: u64) -> (H, [u64; 5]) {
    let mut h = H::new();
    let a = h.grant(0, a_ttl);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    let x = h.grant(0, 100_000);
    let y = h.grant(0, 100_000);
    h.new_sem(0, "S", 2);
    h.new_sem(0, "T", 3);
    h.take(0, "S", a, 2);
    assert_eq!(h.take(0, "T", x, 2), T_TOKEN);
    assert_eq!(h.wait(1, "S", b, 1, 60_000, 0), 1);
    assert_eq!(h.wait(1, "S", c, 1, 60_000, 0), 2);
    assert_eq!(h.wait(1, "T", a, 2, 60_000, 0), 1);
    assert_eq!(h.wait(1, "T", y, 1, 60_000, 0), 2);
    (h, [a, b, c, x, y])
}

fn assert_lease_end_handed_off(h: &H, ids: [u64; 5], idx: u64) {
    let [a, b, c, x, y] = ids;
    assert!(!h.sm.leases.contains_key(&a));
    assert_eq!(h.holders("S"), vec![(b, 1, idx), (c, 1, idx)]);
    assert!(h.queue("S").is_empty());
    assert_eq!(h.holders("T"), vec![(x, 2, T_TOKEN), (y, 1, idx)]);
    assert!(h.queue("T").is_empty());
    assert!(h.sm.sem_wait_expiry.is_empty());
    for id in [b, c, y] {
        assert!(h.sm.leases[&id].sem_waiting.is_empty());
    }
    assert_eq!(h.sems_of(y), vec!["T"]);
}

#[test]
fn revoking_a_lease_releases_its_permits_drops_its_waits_and_hands_off_in_that_step() {
    let (mut h, ids) = lease_end_setup(100_000);
    let idx = h.revoke(10, ids[0]);
    assert_lease_end_handed_off(&h, ids, idx);
}

#[test]
fn an_expiring_lease_releases_its_permits_drops_its_waits_and_hands_off_in_that_step() {
    let (mut h, ids) = lease_end_setup(5_000);
    h.tick(4_999);
    assert_eq!(h.holders("S").len(), 1);
    assert_eq!(h.queue("T"), vec![ids[0], ids[4]]);
    let idx = h.tick(5_000);
    assert_lease_end_handed_off(&h, ids, idx);
}

#[test]
fn a_waiter_whose_lease_ended_is_never_granted() {
    // Ended before the release, in the same entry (expiry runs first), by revoke or release.
    for revoke in [false, true] {
        let mut h = H::new();
        let a = h.grant(0, 100_000);
        let b = h.grant(0, 2_000);
        let c = h.grant(0, 100_000);
        h.new_sem(0, "S", 1);
        h.take(0, "S", a, 1);
        h.wait(0, "S", b, 1, 60_000, 0);
        h.wait(0, "S", c, 1, 60_000, 0);
        if revoke {
            h.revoke(2_500, a);
        } else {
            assert_eq!(
                h.release(2_500, "S", a),
                Response::SemReleased { granted: vec![c] }
            );
        }
        assert!(!h.sm.leases.contains_key(&b));
        assert_eq!(h.holders("S"), vec![(c, 1, h.index)]);
        assert!(h.queue("S").is_empty());
    }
}

#[test]
fn holder_and_waiter_expiring_in_one_step_end_up_with_the_live_waiter_holding() {
    // (holder ttl, first waiter ttl): the waiter's lease ends first, then the holder's;
    // and the holder's first, then the waiter's (granted and released within the step).
    for (a_ttl, b_ttl) in [(3_000, 2_000), (2_000, 3_000)] {
        let mut h = H::new();
        let a = h.grant(0, a_ttl);
        let b = h.grant(0, b_ttl);
        let c = h.grant(0, 100_000);
        h.new_sem(0, "S", 1);
        h.take(0, "S", a, 1);
        h.wait(0, "S", b, 1, 60_000, 0);
        h.wait(0, "S", c, 1, 60_000, 0);
        let tick = h.tick(3_000);
        assert_eq!(h.sm.leases.keys().copied().collect::<Vec<_>>(), vec![c]);
        assert_eq!(h.holders("S"), vec![(c, 1, tick)]);
        assert!(h.queue("S").is_empty());
        assert!(h.sm.sem_wait_expiry.is_empty());
    }
}

#[test]
fn a_waiter_removed_by_revoke_lets_the_ones_behind_it_in() {
    let (mut h, a, b, c) = setup(3);
    h.take(0, "S", a, 2);
    h.wait(1, "S", b, 3, 60_000, 0);
    h.wait(2, "S", c, 1, 60_000, 0);
    let idx = h.revoke(3, b);
    assert_eq!(h.holders("S"), vec![(a, 2, 5), (c, 1, idx)]);
    assert!(h.queue("S").is_empty());
}

#[test]
fn ending_a_lease_that_holds_a_lock_and_permits_releases_both() {
    for revoke in [false, true] {
        let mut h = H::new();
        let a = h.grant(0, 5_000);
        let b = h.grant(0, 100_000);
        let c = h.grant(0, 100_000);
        h.new_sem(0, "S", 2);
        let lock_token = h.index + 1;
        assert_eq!(
            h.lock_acquire(0, "L", a, 0),
            Response::LockGranted { token: lock_token }
        );
        h.take(0, "S", a, 2);
        assert_eq!(
            h.lock_acquire(1, "L", b, 60_000),
            Response::LockQueued { position: 1 }
        );
        h.wait(1, "S", c, 2, 60_000, 0);
        let idx = if revoke {
            h.revoke(10, a)
        } else {
            h.tick(5_000)
        };
        assert!(!h.sm.leases.contains_key(&a));
        assert_eq!(h.lock_holder("L"), Some((b, idx)));
        assert_eq!(h.holders("S"), vec![(c, 2, idx)]);
        assert!(h.queue("S").is_empty());
        assert!(h.sm.leases[&b].locks.contains("L"));
        assert_eq!(h.sems_of(c), vec!["S"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Locks, duplicates, snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn a_lock_and_a_semaphore_with_the_same_name_are_independent() {
    let mut h = H::new();
    let a = h.grant(0, 100_000);
    let b = h.grant(0, 100_000);
    h.new_sem(0, "X", 1);
    assert!(h.sm.locks.is_empty());

    let lt = h.index + 1;
    assert_eq!(
        h.lock_acquire(1, "X", a, 0),
        Response::LockGranted { token: lt }
    );
    // Holding lock X does not take a permit of semaphore X.
    let st = h.take(2, "X", b, 1);
    assert_eq!(h.lock_holder("X"), Some((a, lt)));
    assert_eq!(h.holders("X"), vec![(b, 1, st)]);
    assert_eq!(code(&h.acquire(3, "X", a, 1, 0, 0)), ErrorCode::LockHeld);
    assert_eq!(code(&h.lock_acquire(3, "X", b, 0)), ErrorCode::LockHeld);
    // Releasing one the lease does not hold is a conflict, whatever it holds under that name.
    assert_eq!(code(&h.release(4, "X", a)), ErrorCode::Conflict);
    assert_eq!(code(&h.lock_release(4, "X", b)), ErrorCode::Conflict);

    // Releasing the lock leaves the semaphore alone, and the other way round.
    assert_eq!(
        h.lock_release(5, "X", a),
        Response::LockReleased { next_holder: None }
    );
    assert!(h.sm.locks.is_empty());
    assert_eq!(h.holders("X"), vec![(b, 1, st)]);
    let lt2 = h.index + 1;
    assert_eq!(
        h.lock_acquire(6, "X", b, 0),
        Response::LockGranted { token: lt2 }
    );
    assert_eq!(
        h.release(7, "X", b),
        Response::SemReleased { granted: vec![] }
    );
    assert_eq!(h.lock_holder("X"), Some((b, lt2)));
    assert!(h.holders("X").is_empty());
    assert_eq!(h.sm.semaphores["X"].capacity, 1);
    // A lock does not need a semaphore, nor a semaphore a lock.
    assert_eq!(code(&h.acquire(8, "L", a, 1, 0, 0)), ErrorCode::NotFound);
}

#[test]
fn a_retried_acquire_with_the_same_request_id_applies_once() {
    let (mut h, a, b, _) = setup(1);
    h.take(0, "S", a, 1);
    let cmd = Command::SemAcquire {
        name: "S".into(),
        lease_id: b,
        permits: 1,
        wait_ms: 60_000,
        priority: 0,
    };
    let first = h.apply_req(1, Some("r1"), cmd.clone());
    assert_eq!(first, Response::SemQueued { position: 1 });
    h.release(2, "S", a);
    let granted = h.index;
    assert_eq!(h.holders("S"), vec![(b, 1, granted)]);
    // The retry answers as the first time and does not queue b again.
    let before = h.sm.clone();
    assert_eq!(h.apply_req(3, Some("r1"), cmd), first);
    assert_unchanged(&before, &h.sm);
}

#[test]
fn snapshot_round_trip_is_equal_and_behaves_the_same() {
    let mut h = H::new();
    let a = h.grant(0, 5_000);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    let d = h.grant(0, 100_000);
    h.new_sem(0, "S", 3);
    h.new_sem(0, "T", 1);
    h.take(1, "S", a, 2);
    assert_eq!(h.wait(2, "S", b, 2, 3_000, 0), 1);
    // c's priority puts it ahead of b; neither fits in the one free permit.
    assert_eq!(h.wait(3, "S", c, 2, 60_000, 4), 1);
    h.take(4, "T", c, 1);
    assert_eq!(h.wait(5, "T", d, 1, 60_000, 9), 1);

    let json = serde_json::to_string(&h.sm).expect("serialize");
    let restored: Sm = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(restored, h.sm);
    let mut copy = H {
        sm: restored,
        index: h.index,
        term: h.term,
    };
    let steps = vec![
        (2_000, Command::Tick),
        (3_002, Command::Tick),
        (
            3_500,
            Command::SemRelease {
                name: "T".into(),
                lease_id: c,
            },
        ),
        (5_000, Command::Tick),
        (5_001, Command::LeaseRevoke { lease_id: d }),
    ];
    let mut indexes = Vec::new();
    for (t, cmd) in steps {
        let r1 = h.apply(t, cmd.clone());
        let r2 = copy.apply(t, cmd);
        assert_eq!(r1, r2);
        assert_eq!(h.sm, copy.sm);
        indexes.push(h.index);
    }
    // b's wait ended at 3_002, T went to d at 3_500, a's lease ended at 5_000 and S went to c,
    // then d was revoked.
    assert!(!h.sm.leases.contains_key(&a) && !h.sm.leases.contains_key(&d));
    assert_eq!(h.holders("S"), vec![(c, 2, indexes[3])]);
    assert!(h.queue("S").is_empty());
    assert!(h.holders("T").is_empty() && h.queue("T").is_empty());
    assert!(h.sm.leases[&b].sems.is_empty() && h.sm.leases[&b].sem_waiting.is_empty());
}

#[test]
fn snapshots_from_before_semaphores_still_decode() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    h.lock_acquire(0, "L", a, 0);
    let mut value = serde_json::to_value(&h.sm).expect("serialize");
    let object = value.as_object_mut().expect("Sm is a JSON object");
    for field in ["semaphores", "sem_wait_expiry"] {
        assert!(object.remove(field).is_some(), "{field} is serialized");
    }
    let leases = object["leases"].as_object_mut().expect("leases");
    for lease in leases.values_mut() {
        let lease = lease.as_object_mut().expect("lease");
        for field in ["sems", "sem_waiting"] {
            assert!(lease.remove(field).is_some(), "{field} is serialized");
        }
    }
    let old: Sm = serde_json::from_value(value).expect("old snapshot decodes");
    assert_eq!(old, h.sm);
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// `s0` and `s1` are created up front; `s2` only if a generated create makes it.
const SEMS: [&str; 3] = ["s0", "s1", "s2"];
/// Slots below `LIVE_SLOTS` name a live lease (when there is one), the next one the most
/// recently granted lease (perhaps ended), the last one a lease that never existed.
const LIVE_SLOTS: usize = 4;
const MISSING_LEASE: u64 = 1_000_000;

#[derive(Debug, Clone)]
enum Op {
    Blank,
    Tick,
    /// A leader change: the term goes up and the next normal entry comes `election_ms` later.
    Elect {
        election_ms: u64,
    },
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: usize,
    },
    Revoke {
        lease: usize,
    },
    Create {
        sem: usize,
        capacity: u64,
    },
    Acquire {
        sem: usize,
        lease: usize,
        /// Pick a live lease that neither holds nor waits on the semaphore, if there is one.
        contend: bool,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    },
    Release {
        sem: usize,
        /// `None`: a holder of the semaphore.
        lease: Option<usize>,
    },
    /// A lock with a semaphore's name.
    Lock {
        sem: usize,
        lease: usize,
    },
    /// Released by the lock's holder.
    Unlock {
        sem: usize,
    },
}

#[derive(Debug, Clone)]
struct Step {
    dt: u64,
    /// Stamp the entry `dt` before the current time instead (a clock that went backwards).
    backwards: bool,
    op: Op,
}

fn lease_slot() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..LIVE_SLOTS, 1 => Just(LIVE_SLOTS), 1 => Just(LIVE_SLOTS + 1)]
}

fn sem_slot() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 4 => Just(1usize), 1 => Just(2usize)]
}

fn op_strategy(priorities: bool) -> impl Strategy<Value = Op> {
    let priority = if priorities {
        prop_oneof![20 => 0..=MAX_PRIORITY, 1 => Just(MAX_PRIORITY + 1)].boxed()
    } else {
        Just(0u64).boxed()
    };
    let permits = prop_oneof![1 => Just(0u64), 8 => 1u64..=3, 2 => 4u64..=7];
    let wait_ms = prop_oneof![
        3 => Just(0u64),
        4 => 1u64..3_000,
        4 => 3_000u64..20_000,
        1 => Just(MAX_WAIT_MS + 1),
    ];
    let ttl = prop_oneof![1 => Just(0u64), 3 => MIN_TTL_MS..6_000, 4 => 6_000u64..30_000];
    let capacity = prop_oneof![1 => Just(0u64), 6 => 1u64..=6, 1 => Just(MAX_CAPACITY + 1)];
    prop_oneof![
        1 => Just(Op::Blank),
        4 => Just(Op::Tick),
        1 => (0u64..6_000).prop_map(|election_ms| Op::Elect { election_ms }),
        3 => ttl.prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        3 => lease_slot().prop_map(|lease| Op::KeepAlive { lease }),
        1 => lease_slot().prop_map(|lease| Op::Revoke { lease }),
        1 => (sem_slot(), capacity).prop_map(|(sem, capacity)| Op::Create { sem, capacity }),
        12 => (
            sem_slot(),
            lease_slot(),
            prop::bool::weighted(0.7),
            permits,
            wait_ms,
            priority,
        )
            .prop_map(|(sem, lease, contend, permits, wait_ms, priority)| Op::Acquire {
                sem,
                lease,
                contend,
                permits,
                wait_ms,
                priority,
            }),
        5 => (sem_slot(), prop::option::weighted(0.25, lease_slot()))
            .prop_map(|(sem, lease)| Op::Release { sem, lease }),
        1 => (sem_slot(), lease_slot()).prop_map(|(sem, lease)| Op::Lock { sem, lease }),
        1 => sem_slot().prop_map(|sem| Op::Unlock { sem }),
    ]
}

fn step_strategy(priorities: bool) -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            3 => Just(0u64),
            6 => 1u64..300,
            3 => 300u64..3_000,
            1 => 3_000u64..12_000,
        ],
        prop::bool::weighted(0.1),
        op_strategy(priorities),
    )
        .prop_map(|(dt, backwards, op)| Step { dt, backwards, op })
}

/// Two semaphores and four leases up front (so that permits are contended from the start),
/// then up to 60 commands in all.
fn steps_strategy(priorities: bool) -> impl Strategy<Value = Vec<Step>> {
    let at_once = |op| Step {
        dt: 0,
        backwards: false,
        op,
    };
    (
        1u64..=6,
        1u64..=6,
        prop::collection::vec(MIN_TTL_MS..30_000, 4),
        prop::collection::vec(step_strategy(priorities), 0..=54),
    )
        .prop_map(move |(c0, c1, ttls, rest)| {
            let mut steps = vec![
                at_once(Op::Create {
                    sem: 0,
                    capacity: c0,
                }),
                at_once(Op::Create {
                    sem: 1,
                    capacity: c1,
                }),
            ];
            steps.extend(ttls.into_iter().map(|ttl_ms| at_once(Op::Grant { ttl_ms })));
            steps.extend(rest);
            steps
        })
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ----- A reference model of the semaphore part of the state ---------------------------------

fn model_unqueue(m: &mut Sm, name: &str, lease_id: u64) {
    if let Some(s) = m.semaphores.get_mut(name) {
        if let Some(pos) = s.queue.iter().position(|w| w.lease_id == lease_id) {
            let w = s.queue.remove(pos);
            m.sem_wait_expiry
                .remove(&(w.deadline_ms, name.to_string(), lease_id));
        }
    }
    if let Some(l) = m.leases.get_mut(&lease_id) {
        l.sem_waiting.remove(name);
    }
}

/// Grant from the head while the head fits. Every waiter must be live here: the model never
/// skips a dead one, so a dead waiter left in a queue shows up as a failure.
fn model_hand_off(m: &mut Sm, index: u64, now: u64, name: &str) -> Result<Vec<u64>, String> {
    let mut granted = Vec::new();
    let Some(s) = m.semaphores.get_mut(name) else {
        return Ok(granted);
    };
    while let Some(head) = s.queue.first() {
        let used: u64 = s.holders.values().map(|hd| hd.permits).sum();
        if head.permits > s.capacity - used {
            break;
        }
        let w = s.queue.remove(0);
        m.sem_wait_expiry
            .remove(&(w.deadline_ms, name.to_string(), w.lease_id));
        let l = m
            .leases
            .get_mut(&w.lease_id)
            .ok_or_else(|| format!("model: dead lease {} queued on {name}", w.lease_id))?;
        l.sem_waiting.remove(name);
        l.sems.insert(name.to_string());
        s.holders.insert(
            w.lease_id,
            SemHolder {
                permits: w.permits,
                token: index,
                since_ms: now,
            },
        );
        granted.push(w.lease_id);
    }
    Ok(granted)
}

/// The semaphore effects of ending a lease: drop its waits, release its permits, hand off.
fn model_end_lease(m: &mut Sm, index: u64, now: u64, lease_id: u64) -> Result<(), String> {
    let Some(l) = m.leases.remove(&lease_id) else {
        return Ok(());
    };
    for name in &l.sem_waiting {
        model_unqueue(m, name, lease_id);
    }
    for name in &l.sems {
        if let Some(s) = m.semaphores.get_mut(name) {
            s.holders.remove(&lease_id);
        }
    }
    for name in l.sems.union(&l.sem_waiting) {
        model_hand_off(m, index, now, name)?;
    }
    Ok(())
}

/// The grace of a new term and the expiry at the start of an apply, for semaphores: the
/// earliest deadline first, a semaphore wait before a lease on a tie. Lock waits do not touch
/// semaphores, so they are left out.
fn model_expire(pre: &Sm, index: u64, term: u64, now: u64) -> Result<Sm, String> {
    let mut m = pre.clone();
    if term > m.term {
        let floor = now.saturating_add(LEADER_GRACE_MS);
        for l in m.leases.values_mut() {
            l.deadline_ms = l.deadline_ms.max(floor);
        }
    }
    loop {
        let wait = m.sem_wait_expiry.first().cloned().filter(|e| e.0 <= now);
        let lease = m
            .leases
            .values()
            .map(|l| (l.deadline_ms, l.id))
            .filter(|e| e.0 <= now)
            .min();
        match (wait, lease) {
            (Some((d, name, lease_id)), l) if l.is_none_or(|l| d <= l.0) => {
                model_unqueue(&mut m, &name, lease_id);
                model_hand_off(&mut m, index, now, &name)?;
            }
            (_, Some((_, id))) => model_end_lease(&mut m, index, now, id)?,
            _ => break,
        }
    }
    Ok(m)
}

/// Every lease's deadline, semaphores held and semaphores waited on.
type SemLinks = BTreeMap<u64, (u64, BTreeSet<String>, BTreeSet<String>)>;
/// The semaphore part of a state: semaphores, their wait index, and every lease's links.
type SemView<'a> = (
    &'a BTreeMap<String, Semaphore>,
    &'a BTreeSet<(u64, String, u64)>,
    SemLinks,
);

fn sem_view(sm: &Sm) -> SemView<'_> {
    let links = sm
        .leases
        .iter()
        .map(|(id, l)| (*id, (l.deadline_ms, l.sems.clone(), l.sem_waiting.clone())))
        .collect();
    (&sm.semaphores, &sm.sem_wait_expiry, links)
}

fn reject(code: ErrorCode) -> Response {
    Response::reject(code, "")
}

/// Apply a semaphore command to `m` (the state after expiry) by the policy in the module docs.
/// Rejections carry an empty message: only the code is compared.
fn model_dispatch(m: &mut Sm, index: u64, now: u64, cmd: &Command) -> Result<Response, String> {
    Ok(match cmd {
        Command::SemCreate { name, capacity } => {
            if name.is_empty() || !(1..=MAX_CAPACITY).contains(capacity) {
                reject(ErrorCode::InvalidArgument)
            } else {
                match m.semaphores.get(name) {
                    Some(s) if s.capacity == *capacity => Response::SemCreated {
                        capacity: *capacity,
                        created: false,
                    },
                    Some(_) => reject(ErrorCode::Conflict),
                    None => {
                        m.semaphores.insert(
                            name.clone(),
                            Semaphore {
                                capacity: *capacity,
                                holders: BTreeMap::new(),
                                queue: Vec::new(),
                            },
                        );
                        Response::SemCreated {
                            capacity: *capacity,
                            created: true,
                        }
                    }
                }
            }
        }
        Command::SemAcquire {
            name,
            lease_id,
            permits,
            wait_ms,
            priority,
        } => {
            let Some(s) = m.semaphores.get_mut(name) else {
                return Ok(reject(ErrorCode::NotFound));
            };
            if *permits == 0
                || *permits > s.capacity
                || *priority > MAX_PRIORITY
                || *wait_ms > MAX_WAIT_MS
            {
                return Ok(reject(ErrorCode::InvalidArgument));
            }
            let Some(l) = m.leases.get_mut(lease_id) else {
                return Ok(reject(ErrorCode::LeaseNotFound));
            };
            if let Some(hd) = s.holders.get(lease_id) {
                return Ok(match hd.permits == *permits {
                    true => Response::SemGranted { token: hd.token },
                    false => reject(ErrorCode::Conflict),
                });
            }
            if let Some(pos) = s.queue.iter().position(|w| w.lease_id == *lease_id) {
                return Ok(Response::SemQueued {
                    position: pos as u64 + 1,
                });
            }
            let key = virtual_arrival(now, *priority, index);
            let pos = s.queue.iter().filter(|w| waiter_key(w) < key).count();
            let used: u64 = s.holders.values().map(|hd| hd.permits).sum();
            if pos == 0 && *permits <= s.capacity - used {
                s.holders.insert(
                    *lease_id,
                    SemHolder {
                        permits: *permits,
                        token: index,
                        since_ms: now,
                    },
                );
                l.sems.insert(name.clone());
                Response::SemGranted { token: index }
            } else if *wait_ms == 0 {
                reject(ErrorCode::LockHeld)
            } else {
                let w = SemWaiter {
                    lease_id: *lease_id,
                    permits: *permits,
                    priority: *priority,
                    since_ms: now,
                    deadline_ms: now + wait_ms,
                    seq: index,
                };
                m.sem_wait_expiry
                    .insert((w.deadline_ms, name.clone(), *lease_id));
                s.queue.insert(pos, w);
                l.sem_waiting.insert(name.clone());
                Response::SemQueued {
                    position: pos as u64 + 1,
                }
            }
        }
        Command::SemRelease { name, lease_id } => {
            let Some(l) = m.leases.get_mut(lease_id) else {
                return Ok(reject(ErrorCode::LeaseNotFound));
            };
            let held = m
                .semaphores
                .get_mut(name)
                .and_then(|s| s.holders.remove(lease_id));
            if held.is_none() {
                return Ok(reject(ErrorCode::Conflict));
            }
            l.sems.remove(name);
            Response::SemReleased {
                granted: model_hand_off(m, index, now, name)?,
            }
        }
        Command::LeaseRevoke { lease_id } => match m.leases.contains_key(lease_id) {
            true => {
                model_end_lease(m, index, now, *lease_id)?;
                Response::LeaseRevoked {
                    lease_id: *lease_id,
                }
            }
            false => reject(ErrorCode::LeaseNotFound),
        },
        // Everything else leaves the semaphore part alone; its response is not modelled.
        _ => Response::Done,
    })
}

fn is_sem_command(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::SemCreate { .. } | Command::SemAcquire { .. } | Command::SemRelease { .. }
    )
}

/// A state machine driven by generated steps.
#[derive(Debug, Clone)]
struct Run {
    sm: Sm,
    index: u64,
    /// Leader term of the next entry.
    term: u64,
    /// Election time not yet seen by a normal entry: the next one is stamped that much later.
    election_ms: u64,
    /// Lease ids in grant order.
    granted: Vec<u64>,
}

impl Run {
    fn new() -> Run {
        Run {
            sm: Sm::new(),
            index: 0,
            term: 1,
            election_ms: 0,
            granted: Vec::new(),
        }
    }

    fn lease(&self, slot: usize) -> u64 {
        let live = self.sm.leases.len();
        if slot < LIVE_SLOTS && live > 0 {
            return *self.sm.leases.keys().nth(slot % live).expect("in range");
        }
        match self.granted.last() {
            Some(id) if slot == LIVE_SLOTS => *id,
            _ => MISSING_LEASE,
        }
    }

    /// The concrete log entry for `step` in the current state (`None` for a blank entry).
    fn entry(&self, step: &Step) -> Option<LogEntry> {
        let cmd = match &step.op {
            Op::Blank | Op::Elect { .. } => return None,
            Op::Tick => Command::Tick,
            Op::Grant { ttl_ms } => Command::LeaseGrant {
                ttl_ms: *ttl_ms,
                owner: None,
            },
            Op::KeepAlive { lease } => Command::LeaseKeepAlive {
                lease_id: self.lease(*lease),
            },
            Op::Revoke { lease } => Command::LeaseRevoke {
                lease_id: self.lease(*lease),
            },
            Op::Create { sem, capacity } => Command::SemCreate {
                name: SEMS[*sem].into(),
                capacity: *capacity,
            },
            Op::Acquire {
                sem,
                lease,
                contend,
                permits,
                wait_ms,
                priority,
            } => {
                let name = SEMS[*sem];
                let involved = |id: &u64| {
                    let l = &self.sm.leases[id];
                    l.sems.contains(name) || l.sem_waiting.contains(name)
                };
                let others: Vec<u64> = self
                    .sm
                    .leases
                    .keys()
                    .copied()
                    .filter(|id| !involved(id))
                    .collect();
                let lease_id = match others.len() {
                    n if *contend && n > 0 => others[*lease % n],
                    _ => self.lease(*lease),
                };
                Command::SemAcquire {
                    name: name.into(),
                    lease_id,
                    permits: *permits,
                    wait_ms: *wait_ms,
                    priority: *priority,
                }
            }
            Op::Release { sem, lease } => {
                let name = SEMS[*sem];
                let holder = self
                    .sm
                    .semaphores
                    .get(name)
                    .and_then(|s| s.holders.keys().next())
                    .copied();
                let lease_id = match (lease, holder) {
                    (None, Some(id)) => id,
                    (None, None) => self.lease(0),
                    (Some(slot), _) => self.lease(*slot),
                };
                Command::SemRelease {
                    name: name.into(),
                    lease_id,
                }
            }
            Op::Lock { sem, lease } => Command::LockAcquire {
                name: SEMS[*sem].into(),
                lease_id: self.lease(*lease),
                wait_ms: 2_000,
                mode: LockMode::Exclusive,
            },
            Op::Unlock { sem } => {
                let name = SEMS[*sem];
                let holder = self.sm.locks.get(name).and_then(|l| l.holder.as_ref());
                Command::LockRelease {
                    name: name.into(),
                    lease_id: holder.map_or(self.lease(0), |hd| hd.lease_id),
                }
            }
        };
        let base = self.sm.time_ms + self.election_ms;
        let time_ms = if step.backwards {
            base.saturating_sub(step.dt)
        } else {
            base + step.dt
        };
        Some(LogEntry {
            time_ms,
            request_id: None,
            cmd,
        })
    }

    /// Apply one step at the next index and check everything that must hold after it.
    fn step(&mut self, step: &Step) -> Result<Option<Response>, TestCaseError> {
        self.index += 1;
        let index = self.index;
        let Some(entry) = self.entry(step) else {
            if let Op::Elect { election_ms } = step.op {
                self.term += 1;
                self.election_ms += election_ms;
            }
            let before = self.sm.clone();
            self.sm.apply_other(index);
            let mut expected = before;
            expected.index = index;
            prop_assert_eq!(&self.sm, &expected);
            return Ok(None);
        };
        self.election_ms = 0;
        let term = self.term;
        let pre = self.sm.clone();
        let now = entry.time_ms.max(pre.time_ms);

        let resp = self.sm.apply(index, term, &entry);

        deep_check(&self.sm).map_err(|e| fail(format!("after {entry:?} at {index}: {e}")))?;
        prop_assert_eq!(self.sm.index, index);
        prop_assert_eq!(self.sm.time_ms, now);
        prop_assert_eq!(self.sm.term, term);
        if let Response::LeaseGranted { lease_id, .. } = resp {
            self.granted.push(lease_id);
        }

        // `twin`: the pre-state after only the grace and the expiry of this entry.
        let mut twin = pre.clone();
        let tick = LogEntry {
            time_ms: entry.time_ms,
            request_id: None,
            cmd: Command::Tick,
        };
        prop_assert_eq!(twin.apply(index, term, &tick), Response::Done);
        deep_check(&twin).map_err(|e| fail(format!("twin of {entry:?} at {index}: {e}")))?;

        // Expiry (grace, wait deadlines, lease ends, hand-offs) matches the model.
        let expired = model_expire(&pre, index, term, now).map_err(fail)?;
        prop_assert_eq!(sem_view(&twin), sem_view(&expired), "expiry at {}", index);

        // The command matches the model, applied to the state after expiry.
        let mut model = twin.clone();
        let want = model_dispatch(&mut model, index, now, &entry.cmd).map_err(fail)?;
        match (&resp, &want) {
            // A refused wait is checked against the graph instead of the model (which does not
            // track the other primitives' waits).
            (Response::Rejected(got), _) if got.code == ErrorCode::Deadlock => {
                let victim = match &entry.cmd {
                    Command::LockAcquire { lease_id, .. }
                    | Command::SemAcquire { lease_id, .. } => *lease_id,
                    other => return Err(fail(format!("{other:?} refused as a deadlock"))),
                };
                super::harness::check_deadlock_refusal(&twin, &self.sm, victim, got)
                    .map_err(fail)?;
            }
            (Response::Rejected(got), Response::Rejected(w)) => {
                prop_assert_eq!(got.code, w.code, "{:?}", entry.cmd);
                prop_assert_eq!(&self.sm, &twin, "a rejected command changed the state");
            }
            _ if is_sem_command(&entry.cmd) => {
                prop_assert_eq!(&resp, &want, "{:?}", entry.cmd);
                prop_assert_eq!(&self.sm, &model, "{:?}", entry.cmd);
            }
            _ if matches!(entry.cmd, Command::LeaseRevoke { .. }) => {
                prop_assert_eq!(&resp, &want);
                prop_assert_eq!(sem_view(&self.sm), sem_view(&model), "revoke");
            }
            _ => {
                let (sems, waits, _) = sem_view(&self.sm);
                prop_assert_eq!(sems, &twin.semaphores, "{:?}", entry.cmd);
                prop_assert_eq!(waits, &twin.sem_wait_expiry);
            }
        }

        self.check_grants(&pre, &resp, index)?;
        Ok(Some(resp))
    }

    /// Permits within capacity, grants only to live leases, tokens from the past, and every
    /// new grant's token is this entry's index.
    fn check_grants(&self, pre: &Sm, resp: &Response, index: u64) -> Result<(), TestCaseError> {
        let sm = &self.sm;
        match resp {
            Response::SemGranted { token } => {
                prop_assert!(*token <= index);
                let holds = sm.semaphores.values().any(|s| {
                    s.holders
                        .iter()
                        .any(|(id, hd)| hd.token == *token && sm.leases.contains_key(id))
                });
                prop_assert!(holds, "granted token {} to nobody live", token);
            }
            Response::SemReleased { granted } => {
                for id in granted {
                    prop_assert!(sm.leases.contains_key(id), "granted to dead lease {}", id);
                }
            }
            _ => {}
        }
        for (name, s) in &sm.semaphores {
            prop_assert!(s.used() <= s.capacity, "{} over capacity", name);
            for (id, hd) in &s.holders {
                prop_assert!(
                    sm.leases.contains_key(id),
                    "{} held by dead lease {}",
                    name,
                    id
                );
                prop_assert!(hd.token <= index);
                let before = pre.semaphores.get(name).and_then(|p| p.holders.get(id));
                if before != Some(hd) {
                    prop_assert_eq!(hd.token, index, "new grant of {} to {}", name, id);
                    prop_assert_eq!(hd.since_ms, sm.time_ms);
                }
            }
        }
        Ok(())
    }
}

fn run_all(steps: &[Step]) -> Result<(Run, Vec<Option<Response>>), TestCaseError> {
    let mut run = Run::new();
    let mut responses = Vec::with_capacity(steps.len());
    for s in steps {
        responses.push(run.step(s)?);
    }
    Ok((run, responses))
}

fn check_sequence(steps: &[Step]) -> Result<(), TestCaseError> {
    let (run, _) = run_all(steps)?;
    run.sm.check_invariants().map_err(fail)?;
    Ok(())
}

fn check_snapshot(steps: &[Step], split: prop::sample::Index) -> Result<(), TestCaseError> {
    let split = split.index(steps.len() + 1);
    let (mut run, _) = run_all(&steps[..split])?;
    let json = serde_json::to_string(&run.sm).map_err(fail)?;
    let restored: Sm = serde_json::from_str(&json).map_err(fail)?;
    prop_assert_eq!(&restored, &run.sm);
    let mut copy = Run {
        sm: restored,
        ..run.clone()
    };
    for s in &steps[split..] {
        prop_assert_eq!(run.entry(s), copy.entry(s));
        let r1 = run.step(s)?;
        let r2 = copy.step(s)?;
        prop_assert_eq!(r1, r2);
        prop_assert_eq!(&run.sm, &copy.sm);
    }
    Ok(())
}

fn check_replay(steps: &[Step]) -> Result<(), TestCaseError> {
    let (first, r1) = run_all(steps)?;
    let (second, r2) = run_all(steps)?;
    prop_assert_eq!(r1, r2);
    prop_assert_eq!(&first.sm, &second.sm);
    prop_assert_eq!(
        serde_json::to_string(&first.sm).map_err(fail)?,
        serde_json::to_string(&second.sm).map_err(fail)?
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// All waiters at priority 0: the queue is FIFO.
    #[test]
    fn fifo_sequences_match_the_model_and_keep_the_invariants(steps in steps_strategy(false)) {
        check_sequence(&steps)?;
    }

    #[test]
    fn fifo_snapshot_round_trip_is_equal_and_continues_identically(
        steps in steps_strategy(false),
        split in any::<prop::sample::Index>(),
    ) {
        check_snapshot(&steps, split)?;
    }

    #[test]
    fn fifo_replay_is_deterministic(steps in steps_strategy(false)) {
        check_replay(&steps)?;
    }

    #[test]
    fn priority_sequences_match_the_model_and_keep_the_invariants(
        steps in steps_strategy(true),
    ) {
        check_sequence(&steps)?;
    }

    #[test]
    fn priority_snapshot_round_trip_is_equal_and_continues_identically(
        steps in steps_strategy(true),
        split in any::<prop::sample::Index>(),
    ) {
        check_snapshot(&steps, split)?;
    }

    #[test]
    fn priority_replay_is_deterministic(steps in steps_strategy(true)) {
        check_replay(&steps)?;
    }
}

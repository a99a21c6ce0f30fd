//! Read-write locks and deadlock detection: unit tests and random interleavings (under every
//! deadlock policy). Every apply is followed by `check_invariants` (one writer or many readers,
//! a queue head never fits, readers wait only behind a writer, no cycle in the wait-for graph).

use proptest::prelude::*;

use super::harness::{check_deadlock_refusal, check_victims, expected_victim, Harness};
use super::*;

fn acquire(
    h: &mut Harness,
    t: u64,
    name: &str,
    lease_id: u64,
    wait_ms: u64,
    mode: LockMode,
) -> Response {
    h.apply(
        t,
        Command::LockAcquire {
            name: name.into(),
            lease_id,
            wait_ms,
            mode,
        },
    )
}

fn release(h: &mut Harness, t: u64, name: &str, lease_id: u64) -> Response {
    h.apply(
        t,
        Command::LockRelease {
            name: name.into(),
            lease_id,
        },
    )
}

fn sem_acquire(h: &mut Harness, t: u64, name: &str, lease_id: u64, permits: u64) -> Response {
    sem_acquire_p(h, t, name, lease_id, permits, 0)
}

fn sem_acquire_p(
    h: &mut Harness,
    t: u64,
    name: &str,
    lease_id: u64,
    permits: u64,
    priority: u64,
) -> Response {
    h.apply(
        t,
        Command::SemAcquire {
            name: name.into(),
            lease_id,
            permits,
            wait_ms: 10_000,
            priority,
        },
    )
}

/// (exclusive holder, shared holders, queue as (lease, mode)).
fn view(h: &Harness, name: &str) -> (Option<u64>, Vec<u64>, Vec<(u64, LockMode)>) {
    match h.sm.locks.get(name) {
        None => (None, vec![], vec![]),
        Some(l) => (
            l.holder.as_ref().map(|x| x.lease_id),
            l.shared.keys().copied().collect(),
            l.queue.iter().map(|w| (w.lease_id, w.mode)).collect(),
        ),
    }
}

use LockMode::{Exclusive as X, Shared as S};

#[test]
fn readers_share_a_waiting_writer_blocks_new_readers_and_readers_behind_it_go_together() {
    let mut h = Harness::new();
    let r1 = h.grant(0, 60_000);
    let r2 = h.grant(0, 60_000);
    let w = h.grant(0, 60_000);
    let r3 = h.grant(0, 60_000);
    let r4 = h.grant(0, 60_000);
    let t1 = acquire(&mut h, 1, "L", r1, 0, S);
    assert_eq!(t1, Response::LockGranted { token: h.index });
    let t2 = acquire(&mut h, 2, "L", r2, 0, S);
    assert_eq!(t2, Response::LockGranted { token: h.index });
    // A writer queues behind the readers; a try-writer is refused.
    assert_eq!(
        acquire(&mut h, 3, "L", w, 5_000, X),
        Response::LockQueued { position: 1 }
    );
    // A reader arriving after the waiting writer queues too (writers are not starved), and a
    // try-reader is refused while the writer waits.
    assert_eq!(
        acquire(&mut h, 4, "L", r3, 5_000, S),
        Response::LockQueued { position: 2 }
    );
    match acquire(&mut h, 4, "L", r4, 0, S) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::LockHeld),
        other => panic!("try-reader behind a writer: {other:?}"),
    }
    assert_eq!(
        acquire(&mut h, 5, "L", r4, 5_000, S),
        Response::LockQueued { position: 3 }
    );
    assert_eq!(
        view(&h, "L"),
        (None, vec![r1, r2], vec![(w, X), (r3, S), (r4, S)])
    );
    // The first reader leaving hands nothing on; the last one hands the lock to the writer.
    assert_eq!(
        release(&mut h, 6, "L", r1),
        Response::LockReleased { next_holder: None }
    );
    assert_eq!(
        release(&mut h, 7, "L", r2),
        Response::LockReleased {
            next_holder: Some(w)
        }
    );
    let wt = h.sm.locks["L"].holder.as_ref().unwrap().token;
    assert_eq!(wt, h.index);
    assert!(h.sm.fence_valid("L", wt).0);
    // The writer's release grants both readers behind it in one step, with one token.
    assert_eq!(
        release(&mut h, 8, "L", w),
        Response::LockReleased {
            next_holder: Some(r3)
        }
    );
    assert_eq!(view(&h, "L"), (None, vec![r3, r4], vec![]));
    let l = &h.sm.locks["L"];
    assert_eq!(l.shared[&r3].token, h.index);
    assert_eq!(l.shared[&r4].token, h.index);
    assert!(h.index > wt);
    // Shared tokens do not fence writes.
    assert!(!h.sm.fence_valid("L", h.index).0);
    assert_eq!(h.sm.token_holder("L", h.index), Some((S, r3)));
}

#[test]
fn a_writer_that_gives_up_lets_the_readers_behind_it_join_the_holders() {
    let mut h = Harness::new();
    let r1 = h.grant(0, 60_000);
    let w = h.grant(0, 60_000);
    let r2 = h.grant(0, 60_000);
    acquire(&mut h, 1, "L", r1, 0, S);
    acquire(&mut h, 2, "L", w, 1_000, X);
    acquire(&mut h, 3, "L", r2, 10_000, S);
    assert_eq!(view(&h, "L"), (None, vec![r1], vec![(w, X), (r2, S)]));
    h.tick(1_002);
    assert_eq!(view(&h, "L"), (None, vec![r1, r2], vec![]));
    // The same when the writer's lease is revoked instead.
    let w2 = h.grant(1_100, 60_000);
    let r3 = h.grant(1_100, 60_000);
    acquire(&mut h, 1_101, "L", w2, 10_000, X);
    acquire(&mut h, 1_102, "L", r3, 10_000, S);
    h.revoke(1_103, w2);
    assert_eq!(view(&h, "L"), (None, vec![r1, r2, r3], vec![]));
}

#[test]
fn mode_mismatches_are_conflicts_and_change_nothing() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let t = match acquire(&mut h, 1, "L", a, 0, S) {
        Response::LockGranted { token } => token,
        r => panic!("{r:?}"),
    };
    assert_eq!(
        acquire(&mut h, 2, "L", a, 0, S),
        Response::LockGranted { token: t }
    );
    let before = h.sm.clone();
    match acquire(&mut h, 3, "L", a, 5_000, X) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::Conflict),
        r => panic!("upgrade: {r:?}"),
    }
    assert_eq!(h.sm.locks, before.locks);
    acquire(&mut h, 4, "L", b, 5_000, X);
    match acquire(&mut h, 5, "L", b, 5_000, S) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::Conflict),
        r => panic!("queued writer asking shared: {r:?}"),
    }
    assert_eq!(view(&h, "L"), (None, vec![a], vec![(b, X)]));
}

#[test]
fn a_wait_that_closes_a_cycle_is_refused_with_the_cycle_and_nothing_changes() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    acquire(&mut h, 1, "x", a, 0, X);
    acquire(&mut h, 1, "y", b, 0, X);
    h.apply(
        1,
        Command::SemCreate {
            name: "s".into(),
            capacity: 1,
        },
    );
    sem_acquire(&mut h, 1, "s", c, 1);
    // a -> b (y), b -> c (s), then c -> a (x) closes a -> b -> c -> a.
    assert_eq!(
        acquire(&mut h, 2, "y", a, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(
        sem_acquire(&mut h, 3, "s", b, 1),
        Response::SemQueued { position: 1 }
    );
    let mut twin = h.sm.clone();
    let next = h.index + 1;
    twin.apply(
        next,
        h.term,
        &LogEntry {
            time_ms: 4,
            request_id: None,
            cmd: Command::Tick,
        },
    );
    let r = acquire(&mut h, 4, "x", c, 10_000, X);
    let Response::Rejected(rej) = r else {
        panic!("expected deadlock, got {r:?}")
    };
    assert_eq!(rej.code, ErrorCode::Deadlock);
    let path: Vec<(u64, u64, &str)> = rej
        .cycle
        .iter()
        .map(|e| (e.lease_id, e.waits_for, e.resource.as_str()))
        .collect();
    assert_eq!(
        path,
        vec![(c, a, "lock:x"), (a, b, "lock:y"), (b, c, "semaphore:s")]
    );
    check_deadlock_refusal(&twin, &h.sm, c, &rej).unwrap();
    assert_eq!(h.sm.deadlocks.len(), 1);
    // Readers waiting behind readers are no cycle: shared holds do not conflict.
    acquire(&mut h, 5, "r", a, 0, S);
    assert!(matches!(
        acquire(&mut h, 5, "r", c, 0, S),
        Response::LockGranted { .. }
    ));
    // Ending a lease in the cycle's path unblocks the rest.
    h.revoke(6, c);
    assert_eq!(
        h.sm.semaphores["s"]
            .holders
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![b]
    );
}

#[test]
fn a_semaphore_waiter_does_not_wait_for_holders_it_can_do_without() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    h.apply(
        0,
        Command::SemCreate {
            name: "s".into(),
            capacity: 2,
        },
    );
    sem_acquire(&mut h, 1, "s", a, 1);
    sem_acquire(&mut h, 1, "s", b, 1);
    acquire(&mut h, 1, "x", c, 0, X);
    // c waits for one permit: it needs neither a nor b in particular (no edge), so a waiting
    // for c's lock is not refused.
    assert_eq!(
        sem_acquire(&mut h, 2, "s", c, 1),
        Response::SemQueued { position: 1 }
    );
    assert_eq!(
        acquire(&mut h, 3, "x", a, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    // a waits for c (the lock), c waits for nobody it cannot do without: no cycle.
    assert!(h.sm.wait_edges(c).is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        lock: usize,
        lease: usize,
        wait: bool,
        shared: bool,
    },
    Release {
        lock: usize,
        lease: usize,
    },
    Sem {
        lease: usize,
        permits: u64,
        priority: u64,
    },
    SemRelease {
        lease: usize,
    },
    Revoke {
        lease: usize,
    },
    Tick {
        dt: u64,
    },
    /// Switch the deadlock policy mid-run.
    Policy {
        policy: DeadlockPolicy,
    },
}

pub(super) fn policy() -> impl Strategy<Value = DeadlockPolicy> {
    prop::sample::select(DeadlockPolicy::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3usize, 0..5usize, any::<bool>(), any::<bool>())
            .prop_map(|(lock, lease, wait, shared)| Op::Acquire { lock, lease, wait, shared }),
        6 => (0..3usize, 0..5usize).prop_map(|(lock, lease)| Op::Release { lock, lease }),
        2 => (0..5usize, 1..3u64, 0..3u64)
            .prop_map(|(lease, permits, priority)| Op::Sem { lease, permits, priority }),
        2 => (0..5usize).prop_map(|lease| Op::SemRelease { lease }),
        2 => (0..5usize).prop_map(|lease| Op::Revoke { lease }),
        2 => (0..3_000u64).prop_map(|dt| Op::Tick { dt }),
        1 => policy().prop_map(|policy| Op::Policy { policy }),
    ]
}

/// How the deadlocks of the random runs were resolved, per policy.
#[derive(Default)]
struct Outcomes {
    refusals: std::collections::BTreeMap<DeadlockPolicy, u64>,
    victims: std::collections::BTreeMap<DeadlockPolicy, u64>,
}

/// Random interleavings under every deadlock policy (the one it starts with, and switches):
/// the invariants (checked by the harness after every apply, no cycle in the wait-for graph
/// among them) hold, exclusive tokens only increase per lock, no dead lease is ever granted,
/// every deadlock refusal is a real cycle whose victim the policy picks and changes nothing
/// else, every cancelled wait is a victim the policy picks from a real cycle through the
/// requester, and the snapshot round trip is exact.
#[test]
fn random_interleavings_keep_one_writer_or_many_readers_and_no_cycle() {
    let outcomes = std::cell::RefCell::new(Outcomes::default());
    let config = ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy = (policy(), prop::collection::vec(op(), 1..120));
    let result = runner.run(&strategy, |(start, ops)| {
        run_interleaving(start, ops, &mut outcomes.borrow_mut())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The runs reach every way of resolving a deadlock.
    let o = outcomes.into_inner();
    for p in DeadlockPolicy::ALL {
        assert!(
            o.refusals.get(&p).copied().unwrap_or(0) > 0,
            "no refusal under {p}"
        );
    }
    for p in [DeadlockPolicy::Youngest, DeadlockPolicy::LowestPriority] {
        assert!(
            o.victims.get(&p).copied().unwrap_or(0) > 0,
            "no victim under {p}"
        );
    }
}

fn run_interleaving(
    start: DeadlockPolicy,
    ops: Vec<Op>,
    outcomes: &mut Outcomes,
) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let mut t = 0;
    h.apply(0, Command::SetDeadlockPolicy { policy: start });
    let mut leases: Vec<u64> = (0..5).map(|_| h.grant(0, 4_000)).collect();
    h.apply(
        0,
        Command::SemCreate {
            name: "s".into(),
            capacity: 2,
        },
    );
    let mut last_token = std::collections::BTreeMap::new();
    for op in ops {
        t += 10;
        let twin = {
            let mut tw = h.sm.clone();
            tw.apply(
                h.index + 1,
                h.term,
                &LogEntry {
                    time_ms: t,
                    request_id: None,
                    cmd: Command::Tick,
                },
            );
            tw
        };
        // (response, the requester and its request's priority when it may close a cycle)
        let (r, requester) = match op {
            Op::Acquire {
                lock,
                lease,
                wait,
                shared,
            } => {
                let mode = if shared { S } else { X };
                let id = leases[lease];
                (
                    acquire(
                        &mut h,
                        t,
                        ["a", "b", "c"][lock],
                        id,
                        if wait { 2_000 } else { 0 },
                        mode,
                    ),
                    Some((id, 0)),
                )
            }
            Op::Release { lock, lease } => (
                release(&mut h, t, ["a", "b", "c"][lock], leases[lease]),
                None,
            ),
            Op::Sem {
                lease,
                permits,
                priority,
            } => {
                let id = leases[lease];
                (
                    sem_acquire_p(&mut h, t, "s", id, permits, priority),
                    Some((id, priority)),
                )
            }
            Op::SemRelease { lease } => (
                h.apply(
                    t,
                    Command::SemRelease {
                        name: "s".into(),
                        lease_id: leases[lease],
                    },
                ),
                None,
            ),
            Op::Revoke { lease } => {
                h.revoke(t, leases[lease]);
                leases[lease] = h.grant(t, 4_000);
                continue;
            }
            Op::Tick { dt } => {
                t += dt;
                h.tick(t);
                (Response::Done, None)
            }
            Op::Policy { policy } => (h.apply(t, Command::SetDeadlockPolicy { policy }), None),
        };
        let policy = h.sm.deadlock_policy;
        match (&r, requester) {
            (Response::Rejected(rej), Some((v, priority))) if rej.code == ErrorCode::Deadlock => {
                check_deadlock_refusal(&twin, &h.sm, v, rej).map_err(TestCaseError::fail)?;
                prop_assert_eq!(
                    expected_victim(&twin, &rej.cycle, v, priority),
                    v,
                    "the policy did not pick the refused lease"
                );
                *outcomes.refusals.entry(policy).or_default() += 1;
            }
            (_, Some((v, priority))) => {
                let victims = check_victims(&twin, &h.sm, v, priority, h.index)
                    .map_err(TestCaseError::fail)?;
                *outcomes.victims.entry(policy).or_default() += victims.len() as u64;
            }
            (_, None) => prop_assert!(
                h.sm.deadlocks.iter().all(|d| d.index != h.index),
                "{:?} resolved a deadlock",
                op
            ),
        }
        for (name, lock) in &h.sm.locks {
            for (_, hd) in lock.holders() {
                prop_assert!(h.sm.leases.contains_key(&hd.lease_id));
            }
            if let Some(x) = &lock.holder {
                let prev = last_token.insert(name.clone(), x.token).unwrap_or(0);
                prop_assert!(x.token >= prev, "exclusive token went back on {}", name);
            }
        }
        for sem in h.sm.semaphores.values() {
            for id in sem.holders.keys() {
                prop_assert!(h.sm.leases.contains_key(id));
            }
        }
    }
    h.assert_round_trip();
    Ok(())
}

#[test]
fn a_priority_grant_ahead_of_waiters_that_would_close_a_cycle_is_refused() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    h.apply(
        0,
        Command::SemCreate {
            name: "s".into(),
            capacity: 2,
        },
    );
    acquire(&mut h, 1, "x", a, 0, X);
    sem_acquire(&mut h, 1, "s", c, 1);
    // a waits for 2 permits (needs c's), b waits for a's lock.
    sem_acquire(&mut h, 2, "s", a, 2);
    assert_eq!(
        acquire(&mut h, 3, "x", b, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    // b, with a priority head start, would be granted the free permit ahead of a: then a
    // would wait for b (it needs b's permit too) while b waits for a.
    let r = h.apply(
        4,
        Command::SemAcquire {
            name: "s".into(),
            lease_id: b,
            permits: 1,
            wait_ms: 0,
            priority: 9,
        },
    );
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    assert_eq!(rej.code, ErrorCode::Deadlock);
    assert!(!h.sm.semaphores["s"].holders.contains_key(&b));
}

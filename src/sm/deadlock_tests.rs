//! Deadlock victim policies: `refuse` (the default), `youngest` and `lowest_priority`, over
//! lock cycles, lock and semaphore cycles, several cycles closed at once, and the re-queue of
//! a notified condition waiter. The harness checks every invariant (no cycle in the wait-for
//! graph among them) after every apply.

use super::harness::{check_deadlock_refusal, check_victims, Harness};
use super::*;

use LockMode::{Exclusive as X, Shared as S};

fn lock(
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

fn sem_create(h: &mut Harness, name: &str, capacity: u64) {
    let r = h.apply(
        0,
        Command::SemCreate {
            name: name.into(),
            capacity,
        },
    );
    assert!(matches!(r, Response::SemCreated { .. }), "{r:?}");
}

fn sem(
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

fn set_policy(h: &mut Harness, policy: DeadlockPolicy) -> Response {
    h.apply(0, Command::SetDeadlockPolicy { policy })
}

/// The state before applying at `t` whatever expires by then (for the refusal checks).
fn twin_at(h: &Harness, t: u64) -> Sm {
    let mut twin = h.sm.clone();
    let entry = LogEntry {
        time_ms: t,
        request_id: None,
        cmd: Command::Tick,
    };
    twin.apply(h.index + 1, h.term, &entry);
    twin
}

fn lock_queue(h: &Harness, name: &str) -> Vec<u64> {
    h.sm.locks
        .get(name)
        .map(|l| l.queue.iter().map(|w| w.lease_id).collect())
        .unwrap_or_default()
}

fn sem_queue(h: &Harness, name: &str) -> Vec<u64> {
    h.sm.semaphores[name]
        .queue
        .iter()
        .map(|w| w.lease_id)
        .collect()
}

fn path(cycle: &[WaitEdge]) -> Vec<(u64, u64, &str)> {
    cycle
        .iter()
        .map(|e| (e.lease_id, e.waits_for, e.resource.as_str()))
        .collect()
}

#[test]
fn refuse_is_the_default_and_setting_a_policy_is_replicated_state() {
    let mut h = Harness::new();
    assert_eq!(h.sm.deadlock_policy, DeadlockPolicy::Refuse);
    h.sm.take_events();
    assert_eq!(
        set_policy(&mut h, DeadlockPolicy::Youngest),
        Response::DeadlockPolicySet {
            policy: DeadlockPolicy::Youngest,
            previous: DeadlockPolicy::Refuse
        }
    );
    let ev = h.sm.take_events_of("deadlock");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].action, "policy_set");
    assert_eq!(ev[0].detail["policy"], "youngest");
    // Setting the same policy again answers the same and changes nothing.
    let before = h.sm.clone();
    assert_eq!(
        set_policy(&mut h, DeadlockPolicy::Youngest),
        Response::DeadlockPolicySet {
            policy: DeadlockPolicy::Youngest,
            previous: DeadlockPolicy::Youngest
        }
    );
    assert!(h.sm.take_events_of("deadlock").is_empty());
    assert_eq!(h.sm.deadlock_policy, before.deadlock_policy);
    // The snapshot keeps it.
    h.assert_round_trip();
    let json = serde_json::to_string(&h.sm).unwrap();
    let back: Sm = serde_json::from_str(&json).unwrap();
    assert_eq!(back.deadlock_policy, DeadlockPolicy::Youngest);
    // Names are the API's.
    for p in DeadlockPolicy::ALL {
        assert_eq!(DeadlockPolicy::parse(p.as_str()), Some(p));
        assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
    }
    assert_eq!(DeadlockPolicy::parse("oldest"), None);
}

#[test]
fn a_snapshot_from_before_policies_loads_with_refuse_and_its_records() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "x", a, 0, X);
    lock(&mut h, 1, "y", b, 0, X);
    lock(&mut h, 2, "y", a, 10_000, X);
    assert!(matches!(
        lock(&mut h, 3, "x", b, 10_000, X),
        Response::Rejected(_)
    ));
    let mut v = serde_json::to_value(&h.sm).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("deadlock_policy");
    for d in obj["deadlocks"].as_array_mut().unwrap() {
        let d = d.as_object_mut().unwrap();
        d.remove("requester");
        d.remove("policy");
    }
    let old: Sm = serde_json::from_value(v).unwrap();
    assert_eq!(old.deadlock_policy, DeadlockPolicy::Refuse);
    let d = &old.deadlocks[0];
    assert_eq!(
        (d.victim, d.requester, d.policy),
        (b, None, DeadlockPolicy::Refuse)
    );
    assert_eq!(h.sm.deadlocks[0].requester, Some(b));
}

/// Two leases, two locks: `a` (older) holds x, `b` (younger) holds y and waits for x. Returns
/// (a, b).
fn two_lease_lock_cycle_setup(h: &mut Harness) -> (u64, u64) {
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(h, 1, "x", a, 0, X);
    lock(h, 1, "y", b, 0, X);
    assert_eq!(
        lock(h, 2, "x", b, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    (a, b)
}

#[test]
fn youngest_cancels_the_younger_waiter_and_the_older_requester_stays_queued() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    let (a, b) = two_lease_lock_cycle_setup(&mut h);
    h.sm.take_events();
    let twin = twin_at(&h, 3);
    // a waiting for y closes a -> b (y), b -> a (x); b is the youngest: its wait for x goes.
    assert_eq!(
        lock(&mut h, 3, "y", a, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(lock_queue(&h, "y"), vec![a]);
    assert_eq!(lock_queue(&h, "x"), Vec::<u64>::new());
    assert!(!h.sm.leases[&b].waiting.contains("x"));
    assert!(h.sm.wait_graph().iter().all(|e| e.lease_id == a));
    assert_eq!(check_victims(&twin, &h.sm, a, 0, h.index), Ok(vec![b]));
    let d = h.sm.deadlocks.back().unwrap();
    assert_eq!(
        (
            d.index,
            d.victim,
            d.resource.as_str(),
            d.requester,
            d.policy
        ),
        (h.index, b, "lock:x", Some(a), DeadlockPolicy::Youngest)
    );
    assert_eq!(path(&d.cycle), vec![(b, a, "lock:x"), (a, b, "lock:y")]);
    assert!(d.resolution.contains("youngest"), "{}", d.resolution);
    // Events: the deadlock, the cancelled wait, then the requester's queueing.
    let ev: Vec<(String, String, String)> =
        h.sm.take_events()
            .into_iter()
            .map(|e| (e.kind, e.name, e.action))
            .collect();
    let ev: Vec<(&str, &str, &str)> = ev
        .iter()
        .map(|(k, n, a)| (k.as_str(), n.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        ev,
        vec![
            ("deadlock", "lock:x", "victim"),
            ("lock", "x", "wait_cancelled"),
            ("lock", "y", "queued"),
        ]
    );
    // b gives up y: a gets it, and nothing is left waiting.
    h.apply(
        4,
        Command::LockRelease {
            name: "y".into(),
            lease_id: b,
        },
    );
    assert_eq!(h.sm.locks["y"].holder.as_ref().unwrap().lease_id, a);
    assert!(h.sm.wait_graph().is_empty());
    h.assert_round_trip();
}

#[test]
fn youngest_refuses_the_requester_when_it_is_the_youngest_like_refuse() {
    for policy in DeadlockPolicy::ALL {
        let mut h = Harness::new();
        set_policy(&mut h, policy);
        let a = h.grant(0, 60_000);
        let b = h.grant(0, 60_000);
        lock(&mut h, 1, "x", a, 0, X);
        lock(&mut h, 1, "y", b, 0, X);
        lock(&mut h, 2, "y", a, 10_000, X);
        let twin = twin_at(&h, 3);
        // b (the youngest, and every lock wait has priority 0) closes the cycle: refused.
        let Response::Rejected(rej) = lock(&mut h, 3, "x", b, 10_000, X) else {
            panic!("{policy}: not refused")
        };
        check_deadlock_refusal(&twin, &h.sm, b, &rej).unwrap();
        assert_eq!(lock_queue(&h, "y"), vec![a], "{policy}");
        let d = h.sm.deadlocks.back().unwrap();
        assert_eq!((d.victim, d.requester, d.policy), (b, Some(b), policy));
    }
}

/// Leases a < c < b (by grant order): a holds 1 of 2 permits of s, c holds lock x, b waits
/// for both permits of s (b -> a), c waits for one behind b (c -> b, no barging). Then a
/// waiting for x closes a -> c (x), c -> b (s), b -> a (s).
fn lock_and_semaphore_cycle(policy: DeadlockPolicy) -> (Harness, Sm, Response, [u64; 3]) {
    let mut h = Harness::new();
    set_policy(&mut h, policy);
    sem_create(&mut h, "s", 2);
    let a = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    assert!(matches!(
        sem(&mut h, 1, "s", a, 1, 0),
        Response::SemGranted { .. }
    ));
    lock(&mut h, 1, "x", c, 0, X);
    assert_eq!(
        sem(&mut h, 2, "s", b, 2, 0),
        Response::SemQueued { position: 1 }
    );
    assert_eq!(
        sem(&mut h, 3, "s", c, 1, 0),
        Response::SemQueued { position: 2 }
    );
    let twin = twin_at(&h, 4);
    let r = lock(&mut h, 4, "x", a, 10_000, X);
    (h, twin, r, [a, b, c])
}

#[test]
fn youngest_in_a_lock_and_semaphore_cycle_cancels_a_semaphore_wait_and_hands_the_permit_on() {
    let (h, twin, r, [a, b, c]) = lock_and_semaphore_cycle(DeadlockPolicy::Youngest);
    assert!(b > c && c > a);
    assert_eq!(r, Response::LockQueued { position: 1 });
    // b's wait is gone; c, no longer behind it, fits and is granted in the same step.
    let s = &h.sm.semaphores["s"];
    assert!(s.queue.is_empty());
    assert_eq!(s.holders.keys().copied().collect::<Vec<_>>(), vec![a, c]);
    assert_eq!(s.holders[&c].token, h.index);
    assert!(h.sm.leases[&b].sem_waiting.is_empty());
    assert_eq!(lock_queue(&h, "x"), vec![a]);
    assert_eq!(check_victims(&twin, &h.sm, a, 0, h.index), Ok(vec![b]));
    let d = h.sm.deadlocks.back().unwrap();
    assert_eq!(
        path(&d.cycle),
        vec![
            (b, a, "semaphore:s"),
            (a, c, "lock:x"),
            (c, b, "semaphore:s")
        ]
    );
    assert_eq!(d.resource, "semaphore:s");
}

#[test]
fn lowest_priority_with_equal_priorities_picks_the_youngest() {
    let (h, _, r, [_, b, _]) = lock_and_semaphore_cycle(DeadlockPolicy::LowestPriority);
    assert_eq!(r, Response::LockQueued { position: 1 });
    assert_eq!(h.sm.deadlocks.back().unwrap().victim, b);
}

#[test]
fn refuse_in_the_lock_and_semaphore_cycle_refuses_the_requester() {
    let (h, twin, r, [a, b, c]) = lock_and_semaphore_cycle(DeadlockPolicy::Refuse);
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    check_deadlock_refusal(&twin, &h.sm, a, &rej).unwrap();
    assert_eq!(sem_queue(&h, "s"), vec![b, c]);
}

/// Leases a < b < c: c holds lock x, a holds semaphore s, b holds semaphore t (capacity 1
/// each); b waits for s with priority `b_priority` (b -> a), a waits for x (a -> c, a lock:
/// priority 0), and c asks for t with priority `c_priority`, closing c -> b -> a -> c.
fn priority_cycle(
    policy: DeadlockPolicy,
    b_priority: u64,
    a_sem_priority: Option<u64>,
    c_priority: u64,
) -> (Harness, Sm, Response, [u64; 3]) {
    let mut h = Harness::new();
    set_policy(&mut h, policy);
    sem_create(&mut h, "s", 1);
    sem_create(&mut h, "t", 1);
    sem_create(&mut h, "u", 1);
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    sem(&mut h, 1, "s", a, 1, 0);
    sem(&mut h, 1, "t", b, 1, 0);
    assert!(matches!(
        sem(&mut h, 2, "s", b, 1, b_priority),
        Response::SemQueued { .. }
    ));
    // a waits for c on lock x, or (when given) on semaphore u with that priority.
    match a_sem_priority {
        None => {
            lock(&mut h, 1, "x", c, 0, X);
            assert!(matches!(
                lock(&mut h, 3, "x", a, 10_000, X),
                Response::LockQueued { .. }
            ));
        }
        Some(p) => {
            sem(&mut h, 1, "u", c, 1, 0);
            assert!(matches!(
                sem(&mut h, 3, "u", a, 1, p),
                Response::SemQueued { .. }
            ));
        }
    }
    let twin = twin_at(&h, 4);
    let r = sem(&mut h, 4, "t", c, 1, c_priority);
    (h, twin, r, [a, b, c])
}

#[test]
fn lowest_priority_cancels_the_lowest_priority_wait_even_of_the_oldest_lease() {
    let (h, twin, r, [a, b, c]) = priority_cycle(DeadlockPolicy::LowestPriority, 7, None, 3);
    // c (3) proceeds; a's lock wait (0) is the lowest: a loses it, though it is the oldest.
    assert_eq!(r, Response::SemQueued { position: 1 });
    assert_eq!(sem_queue(&h, "t"), vec![c]);
    assert_eq!(sem_queue(&h, "s"), vec![b]);
    assert_eq!(lock_queue(&h, "x"), Vec::<u64>::new());
    assert!(h.sm.leases[&a].waiting.is_empty());
    assert_eq!(check_victims(&twin, &h.sm, c, 3, h.index), Ok(vec![a]));
    let d = h.sm.deadlocks.back().unwrap();
    assert_eq!(
        path(&d.cycle),
        vec![
            (a, c, "lock:x"),
            (c, b, "semaphore:t"),
            (b, a, "semaphore:s")
        ]
    );
    assert_eq!(d.policy, DeadlockPolicy::LowestPriority);
}

#[test]
fn lowest_priority_refuses_a_requester_of_lower_priority() {
    // c asks with priority 0 and the semaphore waits are 7 and 2: c is refused.
    let (h, twin, r, [a, b, c]) = priority_cycle(DeadlockPolicy::LowestPriority, 7, Some(2), 0);
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    check_deadlock_refusal(&twin, &h.sm, c, &rej).unwrap();
    assert_eq!(sem_queue(&h, "s"), vec![b]);
    assert_eq!(sem_queue(&h, "u"), vec![a]);
}

#[test]
fn lowest_priority_ties_go_to_the_youngest() {
    // a's semaphore wait and c's request both have priority 2: c, the younger, is refused.
    let (h, twin, r, [_, _, c]) = priority_cycle(DeadlockPolicy::LowestPriority, 7, Some(2), 2);
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    check_deadlock_refusal(&twin, &h.sm, c, &rej).unwrap();
    // With c at 3, a (2) loses its semaphore wait instead and the permit of u stays with c.
    let (h, twin, r, [a, _, c]) = priority_cycle(DeadlockPolicy::LowestPriority, 7, Some(2), 3);
    assert_eq!(r, Response::SemQueued { position: 1 });
    assert_eq!(check_victims(&twin, &h.sm, c, 3, h.index), Ok(vec![a]));
    assert!(h.sm.semaphores["u"].queue.is_empty());
    assert_eq!(h.sm.deadlocks.back().unwrap().resource, "semaphore:u");
}

/// Leases by id b < d < a < c. Lock x is shared by b and c; c waits for lock z (held by a),
/// b for lock w (held by d), d for lock y (held by a). a asking for x exclusively closes
/// a -> c -> a and a -> b -> d -> a.
fn two_cycles(policy: DeadlockPolicy) -> (Harness, Sm, Response, [u64; 4]) {
    let mut h = Harness::new();
    set_policy(&mut h, policy);
    let b = h.grant(0, 60_000);
    let d = h.grant(0, 60_000);
    let a = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    lock(&mut h, 1, "x", b, 0, S);
    lock(&mut h, 1, "x", c, 0, S);
    lock(&mut h, 1, "z", a, 0, X);
    lock(&mut h, 1, "y", a, 0, X);
    lock(&mut h, 1, "w", d, 0, X);
    lock(&mut h, 2, "z", c, 10_000, X);
    lock(&mut h, 2, "w", b, 10_000, X);
    lock(&mut h, 2, "y", d, 10_000, X);
    let twin = twin_at(&h, 3);
    let r = lock(&mut h, 3, "x", a, 10_000, X);
    (h, twin, r, [a, b, c, d])
}

#[test]
fn a_requester_picked_in_its_second_cycle_is_refused_and_the_first_victim_keeps_its_wait() {
    let (h, twin, r, [a, b, c, d]) = two_cycles(DeadlockPolicy::Youngest);
    // c would lose a -> c -> a, but a is the youngest of a -> b -> d -> a: refused, and
    // nothing changed (c still waits for z).
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        path(&rej.cycle),
        vec![(a, b, "lock:x"), (b, d, "lock:w"), (d, a, "lock:y")]
    );
    check_deadlock_refusal(&twin, &h.sm, a, &rej).unwrap();
    assert_eq!(lock_queue(&h, "z"), vec![c]);
    assert_eq!(
        h.sm.deadlocks.iter().filter(|x| x.index == h.index).count(),
        1
    );
}

#[test]
fn a_requester_closing_two_cycles_cancels_a_victim_in_each() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    // a is the oldest now: b and c (sharing x) each wait for a lock a holds.
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    lock(&mut h, 1, "x", b, 0, S);
    lock(&mut h, 1, "x", c, 0, S);
    lock(&mut h, 1, "y", a, 0, X);
    lock(&mut h, 1, "z", a, 0, X);
    lock(&mut h, 2, "y", b, 10_000, X);
    lock(&mut h, 2, "z", c, 10_000, X);
    let twin = twin_at(&h, 3);
    assert_eq!(
        lock(&mut h, 3, "x", a, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(check_victims(&twin, &h.sm, a, 0, h.index), Ok(vec![b, c]));
    assert!(lock_queue(&h, "y").is_empty() && lock_queue(&h, "z").is_empty());
    assert_eq!(
        h.sm.deadlocks.iter().filter(|x| x.index == h.index).count(),
        2
    );
    assert!(h.sm.wait_graph().iter().all(|e| e.lease_id == a));
}

#[test]
fn two_cycles_under_refuse_refuse_the_requester_at_the_first() {
    let (h, twin, r, [a, _, c, _]) = two_cycles(DeadlockPolicy::Refuse);
    let Response::Rejected(rej) = r else {
        panic!("{r:?}")
    };
    assert_eq!(path(&rej.cycle), vec![(a, c, "lock:x"), (c, a, "lock:z")]);
    check_deadlock_refusal(&twin, &h.sm, a, &rej).unwrap();
}

#[test]
fn a_notified_condition_waiter_requeues_by_cancelling_the_younger_waiter() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "m", a, 0, X);
    lock(&mut h, 1, "n", a, 0, X);
    let parked = h.apply(
        2,
        Command::CondWait {
            name: "c".into(),
            lease_id: a,
            lock: "m".into(),
            wait_ms: 30_000,
        },
    );
    assert!(matches!(parked, Response::CondWaiting { .. }));
    lock(&mut h, 3, "m", b, 0, X);
    assert_eq!(
        lock(&mut h, 4, "n", b, 30_000, X),
        Response::LockQueued { position: 1 }
    );
    // Waking a re-queues it for m (held by b): a -> b -> a. Under refuse a's wait would be
    // dropped; under youngest b (younger) loses its wait for n and a stays queued for m.
    assert_eq!(
        h.apply(
            5,
            Command::CondNotify {
                name: "c".into(),
                all: false
            }
        ),
        Response::CondNotified { woken: vec![a] }
    );
    assert_eq!(lock_queue(&h, "m"), vec![a]);
    assert!(lock_queue(&h, "n").is_empty());
    let d = h.sm.deadlocks.back().unwrap();
    assert_eq!(
        (d.victim, d.resource.as_str(), d.requester),
        (b, "lock:n", Some(a))
    );
    // b gives m up: a holds it again.
    h.apply(
        6,
        Command::LockRelease {
            name: "m".into(),
            lease_id: b,
        },
    );
    assert_eq!(h.sm.locks["m"].holder.as_ref().unwrap().lease_id, a);
}

#[test]
fn a_requester_granted_when_its_victim_ahead_leaves_the_queue() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    // Leases c < a < b. a reads x and waits for lock z, which c holds; b waits for x
    // exclusively, behind a's shared hold.
    let c = h.grant(0, 60_000);
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "x", a, 0, S);
    lock(&mut h, 1, "z", c, 0, X);
    assert_eq!(
        lock(&mut h, 2, "z", a, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(
        lock(&mut h, 2, "x", b, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    let twin = twin_at(&h, 3);
    h.sm.take_events();
    // c asking x shared queues behind the writer b: c -> b (x), b -> a (x), a -> c (z). b is
    // the youngest: its wait for x ends, and c, compatible with a's shared hold, gets x.
    let r = lock(&mut h, 3, "x", c, 10_000, S);
    assert_eq!(r, Response::LockGranted { token: h.index });
    assert_eq!(check_victims(&twin, &h.sm, c, 0, h.index), Ok(vec![b]));
    let d = h.sm.deadlocks.back().unwrap();
    assert_eq!(
        path(&d.cycle),
        vec![(b, a, "lock:x"), (a, c, "lock:z"), (c, b, "lock:x")]
    );
    let x = &h.sm.locks["x"];
    assert_eq!(x.shared.keys().copied().collect::<Vec<_>>(), vec![c, a]);
    assert_eq!(x.shared[&c].token, h.index);
    assert!(x.queue.is_empty());
    assert!(h.sm.leases[&b].waiting.is_empty());
    // The grant is an event; no `queued` event for the requester.
    let ev = h.sm.take_events_of("lock");
    let actions: Vec<&str> = ev.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, vec!["wait_cancelled", "granted"]);
    assert_eq!(ev[1].detail["lease_id"], c);
}

#[test]
fn the_victims_other_waits_stay_and_only_its_cycle_edge_is_cancelled() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    // Leases c < a < b. a reads x; c holds y; b waits for x exclusively (behind a's shared
    // hold) and for y. c asking x shared closes c -> b (x), b -> c (y): b loses its wait on
    // its own edge of the cycle, y, and keeps waiting for x, ahead of c.
    let c = h.grant(0, 60_000);
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "x", a, 0, S);
    lock(&mut h, 1, "y", c, 0, X);
    lock(&mut h, 2, "x", b, 10_000, X);
    lock(&mut h, 2, "y", b, 10_000, X);
    let twin = twin_at(&h, 3);
    assert_eq!(
        lock(&mut h, 3, "x", c, 10_000, S),
        Response::LockQueued { position: 2 }
    );
    assert_eq!(check_victims(&twin, &h.sm, c, 0, h.index), Ok(vec![b]));
    assert_eq!(h.sm.deadlocks.back().unwrap().resource, "lock:y");
    assert_eq!(lock_queue(&h, "x"), vec![b, c]);
    assert!(lock_queue(&h, "y").is_empty());
}

#[test]
fn a_cancelled_wait_takes_the_edges_into_it_along_so_no_extra_victim_is_picked() {
    let mut h = Harness::new();
    set_policy(&mut h, DeadlockPolicy::Youngest);
    // Leases by id r < hh < x < p < q < v. res: hh reads it, v waits to write (v -> hh), x
    // waits to read behind v (x -> v). hh waits for a (held by r); v also waits for d (held
    // by p), p for e (held by q), q for f (held by r).
    let r = h.grant(0, 60_000);
    let hh = h.grant(0, 60_000);
    let x = h.grant(0, 60_000);
    let p = h.grant(0, 60_000);
    let q = h.grant(0, 60_000);
    let v = h.grant(0, 60_000);
    for (name, lease) in [("a", r), ("f", r), ("c", x), ("d", p), ("e", q)] {
        assert!(matches!(
            lock(&mut h, 1, name, lease, 0, X),
            Response::LockGranted { .. }
        ));
    }
    lock(&mut h, 1, "res", hh, 0, S);
    for (name, lease, mode) in [
        ("res", v, X),
        ("res", x, S),
        ("a", hh, X),
        ("d", v, X),
        ("e", p, X),
        ("f", q, X),
    ] {
        assert!(matches!(
            lock(&mut h, 2, name, lease, 10_000, mode),
            Response::LockQueued { .. }
        ));
    }
    let twin = twin_at(&h, 3);
    // r waiting for c (held by x) closes r -> x -> v -> hh -> r (res) and, longer,
    // r -> x -> v -> p -> q -> r (d). v is the youngest of the first: its wait on res goes,
    // x is no longer behind it and reads res at once, and the second cycle is gone with
    // x's wait: v keeps waiting for d.
    assert_eq!(
        lock(&mut h, 3, "c", r, 10_000, X),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(check_victims(&twin, &h.sm, r, 0, h.index), Ok(vec![v]));
    assert_eq!(h.sm.deadlocks.back().unwrap().resource, "lock:res");
    assert_eq!(lock_queue(&h, "d"), vec![v]);
    let res = &h.sm.locks["res"];
    assert_eq!(res.shared.keys().copied().collect::<Vec<_>>(), vec![hh, x]);
    assert!(res.queue.is_empty());
}

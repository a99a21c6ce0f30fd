//! Condition variables: wait releases the lock and parks atomically, notify re-queues for the
//! lock (new token), timeouts and lease ends leave, a re-queue that would deadlock is refused.

use super::harness::Harness;
use super::*;

fn lock(h: &mut Harness, t: u64, name: &str, lease_id: u64, wait_ms: u64) -> Response {
    h.apply(
        t,
        Command::LockAcquire {
            name: name.into(),
            lease_id,
            wait_ms,
            mode: LockMode::Exclusive,
        },
    )
}

fn wait(h: &mut Harness, t: u64, lease_id: u64, wait_ms: u64) -> Response {
    h.apply(
        t,
        Command::CondWait {
            name: "c".into(),
            lease_id,
            lock: "m".into(),
            wait_ms,
        },
    )
}

fn notify(h: &mut Harness, t: u64, all: bool) -> Response {
    h.apply(
        t,
        Command::CondNotify {
            name: "c".into(),
            all,
        },
    )
}

fn holder(h: &Harness) -> Option<(u64, u64)> {
    h.sm.locks
        .get("m")
        .and_then(|l| l.holder.as_ref())
        .map(|x| (x.lease_id, x.token))
}

fn parked(h: &Harness) -> Vec<u64> {
    h.sm.conditions
        .get("c")
        .map(|c| c.waiters.iter().map(|w| w.lease_id).collect())
        .unwrap_or_default()
}

#[test]
fn waiting_without_the_lock_is_a_conflict_and_changes_nothing() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let before = h.sm.clone();
    match wait(&mut h, 1, a, 1_000) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::Conflict),
        r => panic!("{r:?}"),
    }
    assert_eq!(h.sm.conditions, before.conditions);
    // A shared hold is not enough either.
    h.apply(
        2,
        Command::LockAcquire {
            name: "m".into(),
            lease_id: b,
            wait_ms: 0,
            mode: LockMode::Shared,
        },
    );
    match wait(&mut h, 3, b, 1_000) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::Conflict),
        r => panic!("{r:?}"),
    }
    match wait(&mut h, 3, b, 0) {
        Response::Rejected(r) => assert_eq!(r.code, ErrorCode::InvalidArgument),
        r => panic!("{r:?}"),
    }
    assert!(parked(&h).is_empty());
}

#[test]
fn wait_releases_and_parks_in_one_step_and_notify_requeues_for_a_new_token() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let Response::LockGranted { token: ta } = lock(&mut h, 1, "m", a, 0) else {
        panic!()
    };
    assert_eq!(
        lock(&mut h, 2, "m", b, 10_000),
        Response::LockQueued { position: 1 }
    );
    let r = wait(&mut h, 3, a, 20_000);
    assert_eq!(
        r,
        Response::CondWaiting {
            deadline_ms: 20_003,
            released_token: ta
        }
    );
    // b got the lock in the same step; a is parked.
    assert_eq!(holder(&h), Some((b, h.index)));
    assert_eq!(parked(&h), vec![a]);
    // A retried wait resumes.
    assert!(matches!(
        wait(&mut h, 4, a, 20_000),
        Response::CondWaiting {
            released_token: 0,
            ..
        }
    ));
    assert_eq!(parked(&h), vec![a]);
    // Notify: a queues for the lock b holds.
    assert_eq!(
        notify(&mut h, 5, false),
        Response::CondNotified { woken: vec![a] }
    );
    assert!(parked(&h).is_empty());
    assert_eq!(
        h.sm.locks["m"]
            .queue
            .iter()
            .map(|w| w.lease_id)
            .collect::<Vec<_>>(),
        vec![a]
    );
    // The carried-over deadline.
    assert_eq!(h.sm.locks["m"].queue[0].deadline_ms, 20_003);
    h.apply(
        6,
        Command::LockRelease {
            name: "m".into(),
            lease_id: b,
        },
    );
    let (who, token) = holder(&h).unwrap();
    assert_eq!(who, a);
    assert!(token > ta);
    // Notify with nobody parked wakes nobody.
    assert_eq!(
        notify(&mut h, 7, true),
        Response::CondNotified { woken: vec![] }
    );
}

#[test]
fn notify_all_requeues_in_order_and_a_free_lock_is_taken_at_once() {
    let mut h = Harness::new();
    let ids: Vec<u64> = (0..3).map(|_| h.grant(0, 60_000)).collect();
    for (i, id) in ids.iter().enumerate() {
        let t = 10 * i as u64 + 1;
        assert!(matches!(
            lock(&mut h, t, "m", *id, 0),
            Response::LockGranted { .. }
        ));
        assert!(matches!(
            wait(&mut h, t + 1, *id, 30_000),
            Response::CondWaiting { .. }
        ));
    }
    assert_eq!(parked(&h), ids);
    assert!(!h.sm.locks.contains_key("m"));
    assert_eq!(
        notify(&mut h, 50, true),
        Response::CondNotified { woken: ids.clone() }
    );
    // The first takes the free lock at once, the others queue behind it in order.
    assert_eq!(holder(&h).map(|x| x.0), Some(ids[0]));
    let q: Vec<u64> = h.sm.locks["m"].queue.iter().map(|w| w.lease_id).collect();
    assert_eq!(q, ids[1..].to_vec());
}

#[test]
fn parked_leases_leave_on_timeout_and_on_lease_end() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "m", a, 0);
    wait(&mut h, 2, a, 1_000);
    lock(&mut h, 3, "m", b, 0);
    wait(&mut h, 4, b, 50_000);
    assert_eq!(parked(&h), vec![a, b]);
    h.tick(1_002);
    assert_eq!(parked(&h), vec![b]);
    h.revoke(1_003, b);
    assert!(parked(&h).is_empty());
    assert!(h.sm.conditions.is_empty());
    h.assert_round_trip();
}

#[test]
fn a_notified_lease_whose_requeue_would_deadlock_is_dropped_and_recorded() {
    let mut h = Harness::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    lock(&mut h, 1, "m", a, 0);
    lock(&mut h, 1, "n", a, 0);
    wait(&mut h, 2, a, 30_000); // a parks on c, still holding n
    lock(&mut h, 3, "m", b, 0); // b takes m
    assert_eq!(
        lock(&mut h, 4, "n", b, 30_000),
        Response::LockQueued { position: 1 }
    ); // b -> a
       // Waking a would queue a for m (held by b): a -> b -> a.
    assert_eq!(
        notify(&mut h, 5, false),
        Response::CondNotified { woken: vec![a] }
    );
    assert!(h.sm.locks["m"].queue.is_empty());
    let d = h.sm.deadlocks.back().expect("recorded");
    assert_eq!(d.victim, a);
    assert_eq!(d.resource, "lock:m");
}

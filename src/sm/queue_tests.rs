//! Tests of work queues: push, claim order (priority with aging), the FIFO line of waiting
//! claimers, ack and nack, items returned when a claimant's lease ends, wait deadlines, bounds,
//! bad input, events, snapshots, and property tests over random interleavings (with lease
//! revokes, expiry by ticks and leader changes) that check no item is lost or duplicated.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::harness::Harness;
use super::*;

const Q: &str = "q";

/// Properties that hold right after every apply, beyond `check_invariants`: nothing live is
/// past its deadline.
pub(super) fn deep_check(sm: &Sm) -> Result<(), String> {
    for (name, q) in &sm.queues {
        for w in &q.waiters {
            if w.deadline_ms <= sm.time_ms {
                return Err(format!(
                    "waiter {} of {name} is past its deadline",
                    w.lease_id
                ));
            }
        }
    }
    for (id, l) in &sm.leases {
        if l.deadline_ms <= sm.time_ms {
            return Err(format!("lease {id} is live past its deadline"));
        }
    }
    Ok(())
}

fn h() -> Harness {
    Harness::with_check(deep_check)
}

fn push(h: &mut Harness, t: u64, item: &str, priority: u64) -> Response {
    h.apply(
        t,
        Command::QueuePush {
            name: Q.into(),
            item: item.into(),
            priority,
        },
    )
}

/// Push and return the id.
fn put(h: &mut Harness, t: u64, item: &str, priority: u64) -> u64 {
    match push(h, t, item, priority) {
        Response::QueuePushed { id, .. } => {
            assert_eq!(id, h.index);
            id
        }
        r => panic!("{r:?}"),
    }
}

fn claim(h: &mut Harness, t: u64, lease_id: u64, wait_ms: u64) -> Response {
    h.apply(
        t,
        Command::QueueClaim {
            name: Q.into(),
            lease_id,
            wait_ms,
        },
    )
}

/// Claim at once and return the item id.
fn take(h: &mut Harness, t: u64, lease_id: u64) -> u64 {
    match claim(h, t, lease_id, 0) {
        Response::QueueClaimed { id, token, .. } => {
            assert_eq!(token, h.index);
            id
        }
        r => panic!("{r:?}"),
    }
}

fn ack(h: &mut Harness, t: u64, lease_id: u64, id: u64) -> Response {
    h.apply(
        t,
        Command::QueueAck {
            name: Q.into(),
            lease_id,
            id,
        },
    )
}

fn nack(h: &mut Harness, t: u64, lease_id: u64, id: u64) -> Response {
    h.apply(
        t,
        Command::QueueNack {
            name: Q.into(),
            lease_id,
            id,
        },
    )
}

fn pending(h: &Harness) -> Vec<u64> {
    h.sm.queues
        .get(Q)
        .map(|q| q.pending_in_order().map(|i| i.id).collect())
        .unwrap_or_default()
}

fn claimed(h: &Harness) -> Vec<(u64, u64)> {
    h.sm.queues
        .get(Q)
        .map(|q| {
            q.claimed
                .values()
                .map(|c| (c.item.id, c.lease_id))
                .collect()
        })
        .unwrap_or_default()
}

fn waiting(h: &Harness) -> Vec<u64> {
    h.sm.queues
        .get(Q)
        .map(|q| q.waiters.iter().map(|w| w.lease_id).collect())
        .unwrap_or_default()
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Rejected(x) => x.code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn leases(h: &mut Harness, n: usize) -> Vec<u64> {
    (0..n).map(|_| h.grant(0, 10_000)).collect()
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

#[test]
fn push_stores_the_item_under_the_entry_index() {
    let mut h = h();
    h.sm.take_events_of("queue");
    let r = push(&mut h, 3, "job-1", 4);
    let id = h.index;
    assert_eq!(
        r,
        Response::QueuePushed {
            id,
            claimed_by: None
        }
    );
    let q = &h.sm.queues[Q];
    assert_eq!(
        q.pending[&id],
        QueueItem {
            id,
            item: "job-1".into(),
            priority: 4,
            pushed_ms: 3,
            claims: 0
        }
    );
    assert_eq!(q.bytes, 5);
    let ev = h.sm.take_events_of("queue");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind.as_str(), ev[0].action.as_str()),
        ("queue", "pushed")
    );
    assert_eq!(ev[0].detail["id"], id);
}

#[test]
fn claim_takes_highest_priority_first_and_fifo_within_a_priority() {
    let mut h = h();
    let [a] = leases(&mut h, 1)[..] else { panic!() };
    let x = put(&mut h, 0, "x", 0);
    let y = put(&mut h, 0, "y", 5);
    let z = put(&mut h, 0, "z", 5);
    let w = put(&mut h, 0, "w", 9);
    assert_eq!(pending(&h), vec![w, y, z, x]);
    let r = claim(&mut h, 1, a, 0);
    assert_eq!(
        r,
        Response::QueueClaimed {
            id: w,
            item: "w".into(),
            priority: 9,
            pushed_ms: 0,
            claims: 1,
            token: h.index
        }
    );
    assert_eq!(take(&mut h, 1, a), y);
    assert_eq!(take(&mut h, 1, a), z);
    assert_eq!(take(&mut h, 1, a), x);
    assert_eq!(claimed(&h), vec![(x, a), (y, a), (z, a), (w, a)]);
    assert!(h.sm.leases[&a].parts.contains(&(Kind::Queue, Q.into())));
}

#[test]
fn a_try_claim_on_an_empty_queue_is_timeout_and_changes_nothing() {
    let mut h = h();
    let [a] = leases(&mut h, 1)[..] else { panic!() };
    let r = claim(&mut h, 1, a, 0);
    assert_eq!(code(&r), ErrorCode::Timeout);
    assert!(h.sm.queues.is_empty());
    assert!(h.sm.leases[&a].parts.is_empty());
}

#[test]
fn waiting_claimers_are_served_in_arrival_order_one_item_each() {
    let mut h = h();
    let [a, b, c] = leases(&mut h, 3)[..] else {
        panic!()
    };
    let ra = claim(&mut h, 1, a, 5_000);
    let ta = h.index;
    assert_eq!(
        ra,
        Response::QueueWaiting {
            position: 1,
            ticket: ta
        }
    );
    let rb = claim(&mut h, 2, b, 5_000);
    let tb = h.index;
    assert_eq!(
        rb,
        Response::QueueWaiting {
            position: 2,
            ticket: tb
        }
    );
    // A repeat keeps the place and ticket.
    assert_eq!(
        claim(&mut h, 3, a, 60_000),
        Response::QueueWaiting {
            position: 1,
            ticket: ta
        }
    );
    assert_eq!(h.sm.queues[Q].waiters[0].deadline_ms, 5_001);
    h.sm.take_events_of("queue");
    let r = push(&mut h, 4, "x", 0);
    let x = h.index;
    assert_eq!(
        r,
        Response::QueuePushed {
            id: x,
            claimed_by: Some(a)
        }
    );
    let actions: Vec<_> =
        h.sm.take_events_of("queue")
            .into_iter()
            .map(|e| e.action)
            .collect();
    assert_eq!(actions, vec!["pushed", "claimed"]);
    // c arrives while b waits: c waits behind b rather than taking the next item.
    assert_eq!(
        claim(&mut h, 5, c, 5_000),
        Response::QueueWaiting {
            position: 2,
            ticket: h.index
        }
    );
    let y = put(&mut h, 6, "y", 9);
    let z = put(&mut h, 7, "z", 0);
    let qa = &h.sm.queues[Q];
    assert_eq!(
        (
            qa.claimed[&x].lease_id,
            qa.claimed[&x].ticket,
            qa.claimed[&x].token
        ),
        (a, ta, x)
    );
    assert_eq!((qa.claimed[&y].lease_id, qa.claimed[&y].ticket), (b, tb));
    assert_eq!(qa.claimed[&z].lease_id, c);
    assert!(waiting(&h).is_empty());
    assert_eq!(h.sm.timers.len(), 0);
    // Nobody waits now: the next push stays pending.
    let w = put(&mut h, 8, "w", 0);
    assert_eq!(pending(&h), vec![w]);
}

#[test]
fn ack_completes_only_the_claimants_item() {
    let mut h = h();
    let [a, b] = leases(&mut h, 2)[..] else {
        panic!()
    };
    let x = put(&mut h, 0, "x", 0);
    let y = put(&mut h, 0, "y", 0);
    assert_eq!(take(&mut h, 1, a), x);
    let before = h.sm.clone();
    assert_eq!(code(&ack(&mut h, 2, b, x)), ErrorCode::Conflict);
    assert_eq!(code(&ack(&mut h, 2, a, y)), ErrorCode::Conflict);
    assert_eq!(code(&ack(&mut h, 2, a, 12345)), ErrorCode::NotFound);
    assert_eq!(code(&ack(&mut h, 2, 999, x)), ErrorCode::LeaseNotFound);
    assert_eq!(code(&nack(&mut h, 2, b, x)), ErrorCode::Conflict);
    let r = h.apply(
        2,
        Command::QueueAck {
            name: "other".into(),
            lease_id: a,
            id: x,
        },
    );
    assert_eq!(code(&r), ErrorCode::NotFound);
    assert_eq!(h.sm.queues, before.queues);
    assert_eq!(h.sm.leases, before.leases);
    h.sm.take_events_of("queue");
    assert_eq!(ack(&mut h, 3, a, x), Response::QueueAcked { id: x });
    assert_eq!(h.sm.take_events_of("queue")[0].action, "acked");
    assert!(claimed(&h).is_empty());
    assert_eq!(pending(&h), vec![y]);
    assert_eq!(h.sm.queues[Q].bytes, 1);
    assert!(h.sm.leases[&a].parts.is_empty());
    // Acked twice: the item is gone.
    assert_eq!(code(&ack(&mut h, 4, a, x)), ErrorCode::NotFound);
    // The last item acked: the queue is gone.
    take(&mut h, 5, b);
    ack(&mut h, 6, b, y);
    assert!(h.sm.queues.is_empty());
}

#[test]
fn nack_returns_the_item_to_its_original_place_and_to_a_waiting_claimer() {
    let mut h = h();
    let [a, b] = leases(&mut h, 2)[..] else {
        panic!()
    };
    let x = put(&mut h, 0, "x", 3);
    let y = put(&mut h, 0, "y", 3);
    let z = put(&mut h, 0, "z", 3);
    assert_eq!(take(&mut h, 1, a), x);
    assert_eq!(take(&mut h, 1, a), y);
    h.sm.take_events_of("queue");
    assert_eq!(
        nack(&mut h, 2, a, y),
        Response::QueueReturned {
            id: y,
            claimed_by: None
        }
    );
    assert_eq!(
        nack(&mut h, 2, a, x),
        Response::QueueReturned {
            id: x,
            claimed_by: None
        }
    );
    assert_eq!(pending(&h), vec![x, y, z]);
    let ev = h.sm.take_events_of("queue");
    assert_eq!(ev[0].action, "returned");
    assert_eq!(ev[0].detail["reason"], "released");
    assert!(h.sm.leases[&a].parts.is_empty());
    // Claimed again: the redelivery count goes up.
    match claim(&mut h, 3, b, 0) {
        Response::QueueClaimed { id, claims, .. } => assert_eq!((id, claims), (x, 2)),
        r => panic!("{r:?}"),
    }
    take(&mut h, 3, b);
    take(&mut h, 3, b);
    // a waits; b gives one back: a gets it in that step.
    assert!(matches!(
        claim(&mut h, 4, a, 5_000),
        Response::QueueWaiting { .. }
    ));
    assert_eq!(
        nack(&mut h, 5, b, z),
        Response::QueueReturned {
            id: z,
            claimed_by: Some(a)
        }
    );
    assert_eq!(h.sm.queues[Q].claimed[&z].lease_id, a);
    assert!(waiting(&h).is_empty());
}

#[test]
fn a_claimants_lease_end_returns_its_items_and_hands_them_on_in_that_step() {
    for by_expiry in [false, true] {
        let mut h = h();
        let a = h.grant(0, 1_000);
        let b = h.grant(0, 60_000);
        let c = h.grant(0, 60_000);
        let x = put(&mut h, 0, "x", 0);
        let y = put(&mut h, 0, "y", 0);
        assert_eq!(take(&mut h, 0, a), x);
        assert_eq!(take(&mut h, 0, a), y);
        claim(&mut h, 0, b, 30_000);
        claim(&mut h, 0, c, 30_000);
        // a also waits for a third item: its wait ends with it.
        claim(&mut h, 0, a, 30_000);
        assert_eq!(waiting(&h), vec![b, c, a]);
        h.sm.take_events_of("queue");
        if by_expiry {
            h.tick(1_000);
        } else {
            h.revoke(500, a);
        }
        let idx = h.index;
        assert!(!h.sm.leases.contains_key(&a));
        assert_eq!(claimed(&h), vec![(x, b), (y, c)]);
        let q = &h.sm.queues[Q];
        assert_eq!((q.claimed[&x].token, q.claimed[&x].item.claims), (idx, 2));
        assert!(waiting(&h).is_empty());
        assert!(h.sm.timers.is_empty());
        let actions: Vec<_> =
            h.sm.take_events_of("queue")
                .into_iter()
                .map(|e| e.action)
                .collect();
        assert_eq!(
            actions,
            vec!["left", "returned", "returned", "claimed", "claimed"]
        );
    }
}

#[test]
fn a_returned_item_goes_to_the_head_when_it_was_there_first() {
    let mut h = h();
    let [a, b] = leases(&mut h, 2)[..] else {
        panic!()
    };
    let x = put(&mut h, 0, "x", 0);
    assert_eq!(take(&mut h, 1, a), x);
    let y = put(&mut h, 2, "y", 0);
    h.revoke(3, a);
    assert_eq!(pending(&h), vec![x, y]);
    assert_eq!(take(&mut h, 4, b), x);
}

#[test]
fn a_waiter_leaves_at_its_deadline() {
    let mut h = h();
    let [a, b] = leases(&mut h, 2)[..] else {
        panic!()
    };
    claim(&mut h, 0, a, 100);
    claim(&mut h, 0, b, 200);
    h.sm.take_events_of("queue");
    h.tick(100);
    assert_eq!(waiting(&h), vec![b]);
    assert!(h.sm.leases[&a].parts.is_empty());
    let ev = h.sm.take_events_of("queue");
    assert_eq!(
        (ev[0].action.as_str(), ev[0].detail["reason"].as_str()),
        ("left", Some("timeout"))
    );
    h.tick(200);
    assert!(h.sm.queues.is_empty());
    // A push after the deadlines stays pending.
    put(&mut h, 300, "x", 0);
    assert!(claimed(&h).is_empty());
}

#[test]
fn aging_bound_holds_for_every_pair_of_priorities() {
    for p in 0..=MAX_PRIORITY {
        for q in p + 1..=MAX_PRIORITY {
            let mut h = h();
            let a = h.grant(0, 100_000);
            let low = put(&mut h, 1_000, "low", p);
            // Pushed just inside the head start: passes the older low-priority item.
            let t_in = 1_000 + (q - p) * AGING_MS - 1;
            let inside = put(&mut h, t_in, "in", q);
            // Pushed at the edge: does not.
            let edge = put(&mut h, 1_000 + (q - p) * AGING_MS, "edge", q);
            assert_eq!(pending(&h), vec![inside, low, edge], "p {p} q {q}");
            assert_eq!(take(&mut h, 20_000, a), inside);
            assert_eq!(take(&mut h, 20_000, a), low);
        }
    }
    // The general bound: a priority-0 item is passed by nothing pushed 9 aging steps later.
    let mut h = h();
    let a = h.grant(0, 100_000);
    let low = put(&mut h, 0, "low", 0);
    put(&mut h, MAX_PRIORITY * AGING_MS, "late", MAX_PRIORITY);
    assert_eq!(take(&mut h, 10_000, a), low);
}

#[test]
fn bad_input_is_rejected_with_a_stable_code_and_changes_nothing() {
    let mut h = h();
    let [a] = leases(&mut h, 1)[..] else { panic!() };
    put(&mut h, 0, "x", 0);
    let before = h.sm.clone();
    let big = "x".repeat(MAX_ITEM_LEN + 1);
    assert_eq!(code(&push(&mut h, 1, &big, 0)), ErrorCode::PayloadTooLarge);
    assert_eq!(
        code(&push(&mut h, 1, "y", MAX_PRIORITY + 1)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(&claim(&mut h, 1, a, MAX_WAIT_MS + 1)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(&claim(&mut h, 1, 999, 0)), ErrorCode::LeaseNotFound);
    let r = h.apply(
        1,
        Command::QueuePush {
            name: String::new(),
            item: "y".into(),
            priority: 0,
        },
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    let r = h.apply(
        1,
        Command::QueueClaim {
            name: String::new(),
            lease_id: a,
            wait_ms: 0,
        },
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    assert_eq!(h.sm.queues, before.queues);
    assert_eq!(h.sm.leases, before.leases);
    assert_eq!(h.sm.timers, before.timers);
    // The largest item is fine.
    let max = "m".repeat(MAX_ITEM_LEN);
    assert!(matches!(
        push(&mut h, 2, &max, 0),
        Response::QueuePushed { .. }
    ));
}

#[test]
fn a_full_queue_rejects_pushes_with_resource_exhausted() {
    // By count: fill the state directly (100k applies would each re-check every item).
    let mut h = h();
    let mut q = WorkQueue::default();
    for id in 1..=MAX_QUEUE_ITEMS as u64 {
        q.insert_pending(QueueItem {
            id,
            item: String::new(),
            priority: 0,
            pushed_ms: 0,
            claims: 0,
        });
    }
    h.sm.queues.insert(Q.into(), q);
    h.index = MAX_QUEUE_ITEMS as u64;
    let before = h.sm.queues.clone();
    assert_eq!(code(&push(&mut h, 1, "", 0)), ErrorCode::ResourceExhausted);
    assert_eq!(h.sm.queues, before);
    // Another queue is not affected.
    let r = h.apply(
        1,
        Command::QueuePush {
            name: "other".into(),
            item: "x".into(),
            priority: 0,
        },
    );
    assert!(matches!(r, Response::QueuePushed { .. }));

    // By bytes.
    let mut h = h_bytes();
    assert_eq!(code(&push(&mut h, 1, "x", 0)), ErrorCode::ResourceExhausted);
    assert_eq!(h.sm.queues[Q].bytes, MAX_QUEUE_BYTES);
}

fn h_bytes() -> Harness {
    let mut h = h();
    let n = MAX_QUEUE_BYTES / MAX_ITEM_LEN as u64;
    for _ in 0..n {
        put(&mut h, 0, &"b".repeat(MAX_ITEM_LEN), 0);
    }
    h
}

#[test]
fn a_retried_claim_with_the_same_request_id_applies_once() {
    let mut h = h();
    let [a] = leases(&mut h, 1)[..] else { panic!() };
    let x = put(&mut h, 0, "x", 0);
    put(&mut h, 0, "y", 0);
    let cmd = Command::QueueClaim {
        name: Q.into(),
        lease_id: a,
        wait_ms: 0,
    };
    let r1 = h.apply_req(1, Some("rq"), cmd.clone());
    let r2 = h.apply_req(2, Some("rq"), cmd);
    assert_eq!(r1, r2);
    assert_eq!(claimed(&h), vec![(x, a)]);
    assert_eq!(pending(&h).len(), 1);
}

#[test]
fn snapshot_round_trip_keeps_queues_and_their_timers() {
    let mut h = h();
    let [a, b, c] = leases(&mut h, 3)[..] else {
        panic!()
    };
    put(&mut h, 0, "x", 2);
    take(&mut h, 0, a);
    claim(&mut h, 0, b, 1_000);
    claim(&mut h, 0, c, 2_000);
    h.assert_round_trip();
    let json = serde_json::to_string(&h.sm).unwrap();
    let mut back: Sm = serde_json::from_str(&json).unwrap();
    let e = LogEntry {
        time_ms: 1_000,
        request_id: None,
        cmd: Command::Tick,
    };
    back.apply(h.index + 1, h.term, &e);
    h.tick(1_000);
    assert_eq!(back, h.sm);
    assert_eq!(waiting(&h), vec![c]);
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

const NAMES: [&str; 2] = ["q0", "q1"];
const SLOTS: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: usize,
    },
    Revoke {
        lease: usize,
    },
    Tick,
    NewTerm,
    Push {
        q: usize,
        priority: u64,
        big: bool,
    },
    Claim {
        q: usize,
        lease: usize,
        wait_ms: u64,
    },
    /// `own`: a claimed item by its claimant (when there is one); otherwise item `pick` of
    /// the ids pushed so far, by lease `lease`.
    Ack {
        q: usize,
        pick: usize,
        own: bool,
        lease: usize,
    },
    Nack {
        q: usize,
        pick: usize,
        own: bool,
        lease: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let lease = 0..SLOTS + 1;
    let q = 0..NAMES.len();
    let wait = prop_oneof![3 => Just(0u64), 5 => 1u64..4_000, 1 => Just(MAX_WAIT_MS + 1)];
    let ttl = prop_oneof![1 => Just(10u64), 6 => MIN_TTL_MS..6_000];
    let priority = prop_oneof![20 => 0..=MAX_PRIORITY, 1 => Just(MAX_PRIORITY + 1)];
    let settle = (
        q.clone(),
        any::<usize>(),
        prop::bool::weighted(0.8),
        lease.clone(),
    );
    prop_oneof![
        3 => ttl.prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        3 => lease.clone().prop_map(|lease| Op::KeepAlive { lease }),
        1 => lease.clone().prop_map(|lease| Op::Revoke { lease }),
        3 => Just(Op::Tick),
        1 => Just(Op::NewTerm),
        8 => (q.clone(), priority, prop::bool::weighted(0.03))
            .prop_map(|(q, priority, big)| Op::Push { q, priority, big }),
        8 => (q, lease, wait).prop_map(|(q, lease, wait_ms)| Op::Claim { q, lease, wait_ms }),
        4 => settle.clone().prop_map(|(q, pick, own, lease)| Op::Ack { q, pick, own, lease }),
        3 => settle.prop_map(|(q, pick, own, lease)| Op::Nack { q, pick, own, lease }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<(u64, Op)>> {
    let dt = prop_oneof![2 => Just(0u64), 5 => 1u64..500, 3 => 500u64..3_000];
    let grants = prop::collection::vec(MIN_TTL_MS..30_000, 4).prop_map(|ttls| {
        ttls.into_iter()
            .map(|ttl_ms| (0, Op::Grant { ttl_ms }))
            .collect()
    });
    (grants, prop::collection::vec((dt, op_strategy()), 1..90)).prop_map(
        |(mut g, rest): (Vec<(u64, Op)>, _)| {
            g.extend(rest);
            g
        },
    )
}

#[derive(Default, Clone)]
struct Ledger {
    pushed: BTreeSet<u64>,
    acked: BTreeSet<u64>,
}

struct Run {
    h: Harness,
    now: u64,
    granted: Vec<u64>,
    ledgers: BTreeMap<String, Ledger>,
    responses: Vec<Response>,
}

impl Run {
    fn new() -> Run {
        Run {
            h: h(),
            now: 0,
            granted: Vec::new(),
            ledgers: BTreeMap::new(),
            responses: Vec::new(),
        }
    }

    fn lease(&self, slot: usize) -> u64 {
        let live = self.h.sm.leases.len();
        if slot < SLOTS && live > 0 {
            return *self.h.sm.leases.keys().nth(slot % live).unwrap();
        }
        match self.granted.last() {
            Some(id) if slot == SLOTS => *id,
            _ => 1_000_000,
        }
    }

    fn settle_target(&self, q: usize, pick: usize, own: bool, lease: usize) -> (u64, u64) {
        let wq = self.h.sm.queues.get(NAMES[q]);
        if own {
            if let Some(wq) = wq.filter(|w| !w.claimed.is_empty()) {
                let c = wq.claimed.values().nth(pick % wq.claimed.len()).unwrap();
                return (c.lease_id, c.item.id);
            }
        }
        let ids: Vec<u64> = self
            .ledgers
            .get(NAMES[q])
            .map(|l| l.pushed.iter().copied().collect())
            .unwrap_or_default();
        let id = if ids.is_empty() {
            77
        } else {
            ids[pick % ids.len()]
        };
        (self.lease(lease), id)
    }

    fn command(&mut self, op: &Op) -> Option<Command> {
        Some(match op {
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
            Op::Tick => Command::Tick,
            Op::NewTerm => {
                self.h.term += 1;
                return None;
            }
            Op::Push { q, priority, big } => Command::QueuePush {
                name: NAMES[*q].into(),
                item: if *big {
                    "i".repeat(MAX_ITEM_LEN + 1)
                } else {
                    format!("item{}", self.h.index + 1)
                },
                priority: *priority,
            },
            Op::Claim { q, lease, wait_ms } => Command::QueueClaim {
                name: NAMES[*q].into(),
                lease_id: self.lease(*lease),
                wait_ms: *wait_ms,
            },
            Op::Ack {
                q,
                pick,
                own,
                lease,
            } => {
                let (lease_id, id) = self.settle_target(*q, *pick, *own, *lease);
                Command::QueueAck {
                    name: NAMES[*q].into(),
                    lease_id,
                    id,
                }
            }
            Op::Nack {
                q,
                pick,
                own,
                lease,
            } => {
                let (lease_id, id) = self.settle_target(*q, *pick, *own, *lease);
                Command::QueueNack {
                    name: NAMES[*q].into(),
                    lease_id,
                    id,
                }
            }
        })
    }

    fn step(&mut self, dt: u64, op: &Op) -> Result<(), TestCaseError> {
        self.now += dt;
        let Some(cmd) = self.command(op) else {
            return Ok(());
        };
        // The same entry as a Tick: what expiry alone does.
        self.h.sm.take_events_of("queue");
        let mut ticked = self.h.sm.clone();
        ticked.apply(
            self.h.index + 1,
            self.h.term,
            &LogEntry {
                time_ms: self.now,
                request_id: None,
                cmd: Command::Tick,
            },
        );
        let r = self.h.apply(self.now, cmd.clone());
        let idx = self.h.index;
        let events = self.h.sm.take_events_of("queue");
        let tick_events = ticked.take_events_of("queue");
        let sm = &self.h.sm;
        if matches!(r, Response::Rejected(_)) {
            prop_assert_eq!(sm, &ticked, "rejected {:?} changed the state", cmd);
            prop_assert_eq!(&events, &tick_events, "rejected {:?} emitted events", cmd);
        }
        // Every change the command makes is announced.
        prop_assert_eq!(&events[..tick_events.len()], &tick_events[..]);
        if sm.queues != ticked.queues {
            prop_assert!(
                events.len() > tick_events.len(),
                "{:?} changed queues silently",
                cmd
            );
        }
        if let Response::LeaseGranted { lease_id, .. } = r {
            self.granted.push(lease_id);
        }
        let first_waiter = |name: &str| {
            ticked
                .queues
                .get(name)
                .and_then(|q| q.waiters.first().map(|w| w.lease_id))
        };
        match (&cmd, &r) {
            (
                Command::QueuePush {
                    name,
                    item,
                    priority,
                },
                Response::QueuePushed { id, claimed_by },
            ) => {
                prop_assert_eq!(*id, idx);
                let l = self.ledgers.entry(name.clone()).or_default();
                prop_assert!(l.pushed.insert(*id), "id {} reused", id);
                // Handed to the first claimer in line, if there is one.
                prop_assert_eq!(*claimed_by, first_waiter(name));
                let q = &sm.queues[name];
                let stored = q
                    .pending
                    .get(id)
                    .or(q.claimed.get(id).map(|c| &c.item))
                    .unwrap();
                prop_assert_eq!((&stored.item, stored.priority), (item, *priority));
            }
            (
                Command::QueueClaim { name, lease_id, .. },
                Response::QueueClaimed {
                    id, token, claims, ..
                },
            ) => {
                // The first pending item in claim order (after expiry), claimed once more.
                let tq = &ticked.queues[name];
                let head = tq.pending_in_order().next().unwrap();
                prop_assert_eq!(head.id, *id);
                prop_assert_eq!(head.claims + 1, *claims);
                prop_assert!(tq.waiters.is_empty());
                prop_assert_eq!(*token, idx);
                let c = &sm.queues[name].claimed[id];
                prop_assert_eq!((c.lease_id, c.ticket), (*lease_id, idx));
            }
            (
                Command::QueueClaim { name, lease_id, .. },
                Response::QueueWaiting { position, ticket },
            ) => {
                let w = &sm.queues[name].waiters[*position as usize - 1];
                prop_assert_eq!((w.lease_id, w.seq), (*lease_id, *ticket));
            }
            (Command::QueueAck { name, lease_id, id }, Response::QueueAcked { .. }) => {
                prop_assert_eq!(ticked.queues[name].claimed[id].lease_id, *lease_id);
                let l = self.ledgers.entry(name.clone()).or_default();
                prop_assert!(l.acked.insert(*id), "id {} acked twice", id);
            }
            (
                Command::QueueNack { name, lease_id, id },
                Response::QueueReturned { claimed_by, .. },
            ) => {
                prop_assert_eq!(ticked.queues[name].claimed[id].lease_id, *lease_id);
                match claimed_by {
                    Some(l) => {
                        prop_assert_eq!(Some(*l), first_waiter(name));
                        prop_assert_eq!(sm.queues[name].claimed[id].lease_id, *l);
                    }
                    None => prop_assert!(sm.queues[name].pending.contains_key(id)),
                }
            }
            _ => {}
        }
        // Conservation: every pushed item is exactly once pending, claimed or acked.
        for name in NAMES {
            let l = self.ledgers.get(name).cloned().unwrap_or_default();
            let q = sm.queues.get(name);
            let pending: BTreeSet<u64> = q
                .map(|q| q.pending.keys().copied().collect())
                .unwrap_or_default();
            let claimed: BTreeSet<u64> = q
                .map(|q| q.claimed.keys().copied().collect())
                .unwrap_or_default();
            prop_assert!(pending.is_disjoint(&claimed));
            prop_assert!(l.acked.is_disjoint(&pending) && l.acked.is_disjoint(&claimed));
            let all: BTreeSet<u64> = pending
                .union(&claimed)
                .chain(l.acked.iter())
                .copied()
                .collect();
            prop_assert_eq!(&all, &l.pushed, "items lost or invented in {}", name);
            if let Some(q) = q {
                // FIFO among claimers: those served in this step arrived before those left.
                let served: Vec<u64> = q
                    .claimed
                    .values()
                    .filter(|c| c.token == idx && c.ticket < idx)
                    .map(|c| c.ticket)
                    .collect();
                if let (Some(s), Some(w)) = (served.iter().max(), q.waiters.first()) {
                    prop_assert!(*s < w.seq, "claimer {} served before an earlier one", s);
                }
            }
        }
        self.responses.push(r);
        Ok(())
    }
}

fn run(steps: &[(u64, Op)]) -> Result<Run, TestCaseError> {
    let mut r = Run::new();
    for (dt, op) in steps {
        r.step(*dt, op)?;
    }
    Ok(r)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_interleavings_never_lose_or_duplicate_an_item(s in steps()) {
        run(&s)?;
    }

    #[test]
    fn snapshot_round_trip_is_exact_and_continues_identically(
        s in steps(),
        split in any::<prop::sample::Index>(),
    ) {
        let split = split.index(s.len() + 1);
        let mut a = run(&s[..split])?;
        a.h.assert_round_trip();
        let json = serde_json::to_string(&a.h.sm).unwrap();
        let mut b = Run::new();
        b.h.sm = serde_json::from_str(&json).unwrap();
        b.h.index = a.h.index;
        b.h.term = a.h.term;
        b.now = a.now;
        b.granted = a.granted.clone();
        b.responses = a.responses.clone();
        b.ledgers = a.ledgers.clone();
        for (dt, op) in &s[split..] {
            a.step(*dt, op)?;
            b.step(*dt, op)?;
            prop_assert_eq!(a.responses.last(), b.responses.last());
            prop_assert_eq!(&a.h.sm, &b.h.sm);
        }
    }

    #[test]
    fn replay_is_deterministic(s in steps()) {
        let a = run(&s)?;
        let b = run(&s)?;
        prop_assert_eq!(&a.responses, &b.responses);
        prop_assert_eq!(serde_json::to_string(&a.h.sm).unwrap(), serde_json::to_string(&b.h.sm).unwrap());
    }
}

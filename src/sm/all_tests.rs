//! One property test over random interleavings of *all* commands: leases (grant, keepalive,
//! revoke), ticks with time jumps, KV puts (with fences) and deletes, shared and exclusive
//! locks, semaphores with priorities, conditions, barriers, double barriers, elections, work
//! queues and the deadlock policy, over a small pool of names and leases, with new leader terms
//! (each applies the lease grace) and retried request ids now and then.
//!
//! The harness runs `check_invariants` after every apply (one writer or many readers, permits
//! within capacity, no cycle in the wait-for graph, no dead holder or waiter, ...) and the deep
//! checks of the per-primitive tests (`deep_check` below). On top of those per-state checks,
//! every step is checked against the state before it (`pre`) and `pre` after only the entry's
//! grace and expiry (`twin`):
//!
//! - tokens only increase: every hold a step grants (lock, permits, leadership, queue claim),
//!   in its response or by a hand-off, carries the step's index, above every token that resource
//!   granted in earlier steps (tracked across the run: free locks are dropped from the state);
//! - no dead lease is granted anything: walking the step's events in order, every grant names
//!   a lease still alive at that point whose deadline is after every lease or wait deadline
//!   reported passed before it (expiry runs in deadline order);
//! - barriers: a generation only advances, by one, and only by a release of every waiter of
//!   the generation plus the arriving lease, `parties` in all, in that one step; a double
//!   barrier admits its whole entry set at once, and releases every member still inside at once;
//! - deadlocks: every refusal and every cancelled wait is a real cycle through the requester and
//!   the policy's pick (`harness::check_deadlock_refusal`, `check_victims`); only acquires and
//!   notifies resolve deadlocks;
//! - a rejected command, or a retried request id, changes nothing beyond the entry's expiry, and
//!   the retry gets the first answer, exactly while that is within `DEDUP_RETENTION_MS` (tracked
//!   by the test); grant responses agree with the state they leave;
//! - snapshots: every `SNAPSHOT_EVERY` steps the state goes through JSON the way the store
//!   writes it (`SmState`) and back, equal, and the restored copy then follows the run with the
//!   same answers, states and events (so a field serde skips that matters would show);
//! - determinism: replaying the run's log on a fresh state machine gives the same answers and
//!   the same state.
//!
//! The test counts the interesting outcomes (hand-offs, releases, deadlock refusals and
//! victims, leases expiring while they wait, ...) across the run and asserts each happened, so
//! the generator cannot silently degenerate.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestRunner};

use super::barrier_tests::{
    barrier_cmd, db_enter_cmd, db_leave_cmd, ids, parties_strategy, pick_strategy, Pick,
};
use super::harness::{check_deadlock_refusal, check_victims, expected_victim, Harness};
use super::tests::fail;
use super::*;
use crate::store::SmState;

/// Names of locks, semaphores, barriers and elections (a lock and a semaphore of one name are
/// independent).
const NAMES: [&str; 2] = ["a", "b"];
const KEYS: [&str; 2] = ["k0", "k1"];
const COND: &str = "c";
const DOUBLE: &str = "d";
const QUEUE: &str = "q";
/// A lease id that was never granted.
const MISSING_LEASE: u64 = 999_999;
const CASES: u32 = 500;
const MAX_STEPS: usize = 150;
const SNAPSHOT_EVERY: usize = 20;
/// Each counted outcome must happen at least this often across the run.
const MIN_SEEN: u64 = 5;

// ---------------------------------------------------------------------------------------------
// Generated steps
// ---------------------------------------------------------------------------------------------

/// A lease picked among those involved in the resource (holders, members, the leader, a
/// claimant; for an acquire, the leases that hold or wait on another lock or semaphore, so
/// that waits chain into cycles) when `own` and there are any, else by `pick`.
#[derive(Debug, Clone)]
struct Who {
    own: bool,
    pick: Pick,
}

#[derive(Debug, Clone)]
enum Op {
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: Pick,
    },
    Revoke {
        lease: Pick,
    },
    /// A tick after a jump in time: leases and wait deadlines expire.
    Tick {
        jump_ms: u64,
    },
    /// A leader change: a blank entry opens a new term, and the next normal entry (which
    /// applies the lease grace) comes `election_ms` later.
    Elect {
        election_ms: u64,
    },
    /// `fence`: a lock, and how far below its current exclusive token the fence is.
    Put {
        key: usize,
        lease: Option<Pick>,
        fence: Option<(usize, u64)>,
    },
    Delete {
        key: usize,
    },
    Acquire {
        lock: usize,
        lease: Who,
        wait_ms: u64,
        shared: bool,
    },
    Release {
        lock: usize,
        lease: Who,
    },
    SemCreate {
        sem: usize,
        capacity: u64,
    },
    SemAcquire {
        sem: usize,
        lease: Who,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    },
    SemRelease {
        sem: usize,
        lease: Who,
    },
    CondWait {
        lock: usize,
        lease: Who,
        wait_ms: u64,
    },
    CondNotify {
        all: bool,
    },
    /// `back`: name the generation that many before the open one (a resumed wait).
    Barrier {
        name: usize,
        lease: Pick,
        parties: u64,
        wait_ms: u64,
        back: Option<u64>,
    },
    Enter {
        lease: Pick,
        parties: u64,
        wait_ms: u64,
    },
    Leave {
        lease: Who,
        wait_ms: u64,
    },
    Campaign {
        name: usize,
        lease: Pick,
        wait_ms: u64,
    },
    Proclaim {
        name: usize,
        lease: Who,
    },
    Resign {
        name: usize,
        lease: Who,
    },
    Push {
        priority: u64,
    },
    Claim {
        lease: Pick,
        wait_ms: u64,
    },
    /// Ack (or nack) a claimed item, picked by `item`.
    Settle {
        item: Index,
        ack: bool,
        lease: Who,
    },
    Policy {
        policy: DeadlockPolicy,
    },
}

/// The request id of a step.
#[derive(Debug, Clone)]
enum Req {
    None,
    Fresh,
    /// Send an earlier request (same id, same command) again.
    Retry(Index),
}

#[derive(Debug, Clone)]
struct Step {
    dt: u64,
    req: Req,
    op: Op,
}

fn who() -> impl Strategy<Value = Who> {
    (prop::bool::weighted(0.8), pick_strategy()).prop_map(|(own, pick)| Who { own, pick })
}

/// An acquirer: as often a lease busy elsewhere as any.
fn acquirer() -> impl Strategy<Value = Who> {
    (any::<bool>(), pick_strategy()).prop_map(|(own, pick)| Who { own, pick })
}

/// A wait: mostly a few seconds, sometimes none (a try).
fn wait_ms() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 4 => 1u64..6_000]
}

/// Waits for locks and permits: long enough for waits to chain into cycles.
fn acquire_wait_ms() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 4 => 1_000u64..20_000]
}

/// Waits of primitives that need one (barriers, conditions).
fn some_wait_ms() -> impl Strategy<Value = u64> {
    1u64..6_000
}

fn lease_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop_oneof![19 => 1_000u64..15_000, 1 => Just(500u64)]
            .prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        6 => pick_strategy().prop_map(|lease| Op::KeepAlive { lease }),
        2 => pick_strategy().prop_map(|lease| Op::Revoke { lease }),
        3 => prop_oneof![0u64..1_000, 1_000u64..8_000].prop_map(|jump_ms| Op::Tick { jump_ms }),
        1 => (0u64..4_000).prop_map(|election_ms| Op::Elect { election_ms }),
        1 => super::rwlock_tests::policy().prop_map(|policy| Op::Policy { policy }),
    ]
}

fn kv_op() -> impl Strategy<Value = Op> {
    let fence = (0..NAMES.len(), prop_oneof![3 => Just(0u64), 1 => 1u64..3]);
    prop_oneof![
        3 => (
            0..KEYS.len(),
            prop::option::weighted(0.4, pick_strategy()),
            prop::option::weighted(0.5, fence),
        )
            .prop_map(|(key, lease, fence)| Op::Put { key, lease, fence }),
        1 => (0..KEYS.len()).prop_map(|key| Op::Delete { key }),
    ]
}

fn lock_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..NAMES.len(), acquirer(), acquire_wait_ms(), prop::bool::weighted(0.3))
            .prop_map(|(lock, lease, wait_ms, shared)| Op::Acquire { lock, lease, wait_ms, shared }),
        7 => (0..NAMES.len(), who()).prop_map(|(lock, lease)| Op::Release { lock, lease }),
        3 => (0..NAMES.len(), who(), some_wait_ms())
            .prop_map(|(lock, lease, wait_ms)| Op::CondWait { lock, lease, wait_ms }),
        2 => any::<bool>().prop_map(|all| Op::CondNotify { all }),
    ]
}

fn sem_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..NAMES.len(), 1u64..4).prop_map(|(sem, capacity)| Op::SemCreate { sem, capacity }),
        6 => (0..NAMES.len(), acquirer(), 1u64..3, acquire_wait_ms(), 0u64..=MAX_PRIORITY)
            .prop_map(|(sem, lease, permits, wait_ms, priority)| Op::SemAcquire {
                sem,
                lease,
                permits,
                wait_ms,
                priority,
            }),
        4 => (0..NAMES.len(), who()).prop_map(|(sem, lease)| Op::SemRelease { sem, lease }),
    ]
}

fn barrier_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (
            0..NAMES.len(),
            pick_strategy(),
            parties_strategy(),
            some_wait_ms(),
            prop::option::weighted(0.1, 0u64..3),
        )
            .prop_map(|(name, lease, parties, wait_ms, back)| Op::Barrier {
                name,
                lease,
                parties,
                wait_ms,
                back,
            }),
        3 => (pick_strategy(), parties_strategy(), some_wait_ms())
            .prop_map(|(lease, parties, wait_ms)| Op::Enter { lease, parties, wait_ms }),
        3 => (who(), some_wait_ms()).prop_map(|(lease, wait_ms)| Op::Leave { lease, wait_ms }),
    ]
}

fn election_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NAMES.len(), pick_strategy(), wait_ms())
            .prop_map(|(name, lease, wait_ms)| Op::Campaign { name, lease, wait_ms }),
        1 => (0..NAMES.len(), who()).prop_map(|(name, lease)| Op::Proclaim { name, lease }),
        2 => (0..NAMES.len(), who()).prop_map(|(name, lease)| Op::Resign { name, lease }),
    ]
}

fn queue_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..=MAX_PRIORITY).prop_map(|priority| Op::Push { priority }),
        3 => (pick_strategy(), wait_ms()).prop_map(|(lease, wait_ms)| Op::Claim { lease, wait_ms }),
        4 => (any::<Index>(), any::<bool>(), who())
            .prop_map(|(item, ack, lease)| Op::Settle { item, ack, lease }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        18 => lease_op(),
        4 => kv_op(),
        24 => lock_op(),
        11 => sem_op(),
        11 => barrier_op(),
        7 => election_op(),
        10 => queue_op(),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let dt = prop_oneof![2 => Just(0u64), 6 => 1u64..300, 1 => 300u64..2_000];
    let req = prop_oneof![
        17 => Just(Req::None),
        2 => Just(Req::Fresh),
        1 => any::<Index>().prop_map(Req::Retry),
    ];
    (dt, req, op()).prop_map(|(dt, req, op)| Step { dt, req, op })
}

/// A deadlock policy, a few leases and both semaphores first, so that everything is contended
/// from the start.
fn steps() -> impl Strategy<Value = Vec<Step>> {
    let first = |op| Step {
        dt: 0,
        req: Req::None,
        op,
    };
    let grant = (5_000u64..20_000).prop_map(move |ttl_ms| first(Op::Grant { ttl_ms }));
    (
        super::rwlock_tests::policy(),
        prop::collection::vec(grant, 4..=6),
        prop::collection::vec(step(), 1..MAX_STEPS),
    )
        .prop_map(move |(policy, grants, rest)| {
            let mut steps = vec![first(Op::Policy { policy })];
            steps.extend(grants);
            steps.push(first(Op::SemCreate {
                sem: 0,
                capacity: 2,
            }));
            steps.push(first(Op::SemCreate {
                sem: 1,
                capacity: 1,
            }));
            steps.extend(rest);
            steps.truncate(MAX_STEPS);
            steps
        })
}

// ---------------------------------------------------------------------------------------------
// Per-state checks run by the harness
// ---------------------------------------------------------------------------------------------

/// The deep checks of the per-primitive tests, all at once (each only looks at its own parts,
/// and `check_next_deadline` inside them covers every kind of deadline).
fn deep_check(sm: &Sm) -> Result<(), String> {
    super::tests::deep_check(sm)?;
    super::semaphore_tests::deep_check(sm)?;
    super::barrier_tests::deep_check(sm)?;
    super::election_tests::deep_check(sm)?;
    super::queue_tests::deep_check(sm)
}

// ---------------------------------------------------------------------------------------------
// Cross-step checks
// ---------------------------------------------------------------------------------------------

/// One applied step, for the checks.
struct Ctx<'a> {
    cmd: &'a Command,
    resp: &'a Response,
    pre: &'a Sm,
    /// `pre` after only this entry's grace and expiry (a `Tick` at the same time, in the same
    /// term, with the same request id answered as `resp`).
    twin: &'a Sm,
    post: &'a Sm,
    events: &'a [Event],
    index: u64,
    now: u64,
    term: u64,
    /// The first answer, when the entry retried a request id the state remembers.
    dup: Option<Response>,
}

/// The highest token each resource (`lock:a`, `election:b`, ...) granted in earlier steps.
type Tokens = BTreeMap<String, u64>;

/// A hold that is in `post` but not in `pre` was granted by this step: its token is the step's
/// index, above every token of the resource from earlier steps, and its lease lives.
fn check_new_hold(
    c: &Ctx,
    tokens: &Tokens,
    res: &str,
    lease: u64,
    token: u64,
) -> Result<(), String> {
    if token != c.index {
        return Err(format!(
            "{res} granted to {lease} with token {token}, not the index"
        ));
    }
    if tokens.get(res).is_some_and(|t| *t >= token) {
        return Err(format!(
            "token {token} of {res} is not above {:?}",
            tokens.get(res)
        ));
    }
    match c.post.leases.get(&lease) {
        Some(l) if l.deadline_ms > c.now => Ok(()),
        other => Err(format!("{res} granted to dead lease {lease}: {other:?}")),
    }
}

/// Every (resource, lease, token) held after `sm`, for locks, semaphores, elections and queue
/// claims.
fn holds(sm: &Sm) -> BTreeSet<(String, u64, u64)> {
    let locks = sm.locks.iter().flat_map(|(n, l)| {
        l.holders()
            .map(move |(_, h)| (format!("lock:{n}"), h.lease_id, h.token))
    });
    let sems = sm.semaphores.iter().flat_map(|(n, s)| {
        (s.holders.iter()).map(move |(id, h)| (format!("semaphore:{n}"), *id, h.token))
    });
    let elections = (sm.elections.iter())
        .map(|(n, e)| (format!("election:{n}"), e.leader.lease_id, e.leader.token));
    let claims = sm.queues.iter().flat_map(|(n, q)| {
        (q.claimed.values()).map(move |c| (format!("queue:{n}"), c.lease_id, c.token))
    });
    locks.chain(sems).chain(elections).chain(claims).collect()
}

/// Did `lease` wait for `res` (`kind:name`) in `sm`?
fn waited(sm: &Sm, res: &str, lease: u64) -> bool {
    let Some((kind, name)) = res.split_once(':') else {
        return false;
    };
    match kind {
        "lock" => (sm.locks.get(name)).is_some_and(|l| l.queue.iter().any(|w| w.lease_id == lease)),
        "semaphore" => {
            (sm.semaphores.get(name)).is_some_and(|s| s.queue.iter().any(|w| w.lease_id == lease))
        }
        "election" => (sm.elections.get(name))
            .is_some_and(|e| e.candidates.iter().any(|c| c.lease_id == lease)),
        "queue" => {
            (sm.queues.get(name)).is_some_and(|q| q.waiters.iter().any(|w| w.lease_id == lease))
        }
        _ => false,
    }
}

/// New holds carry new, increasing tokens and live leases; returns the hand-offs (grants to a
/// lease that was waiting for the resource) by kind.
fn check_tokens(c: &Ctx, tokens: &mut Tokens) -> Result<Vec<String>, String> {
    let before = holds(c.pre);
    let after = holds(c.post);
    let mut handed = Vec::new();
    for (res, lease, token) in after.difference(&before) {
        check_new_hold(c, tokens, res, *lease, *token)?;
        if waited(c.pre, res, *lease) {
            handed.push(res.split(':').next().unwrap_or("").to_string());
        }
    }
    for (res, _, token) in after {
        let t = tokens.entry(res).or_default();
        *t = (*t).max(token);
    }
    Ok(handed)
}

/// The leases a grant event hands something to.
fn granted_in(e: &Event) -> Vec<u64> {
    match (e.kind.as_str(), e.action.as_str()) {
        ("lock" | "semaphore", "granted") | ("election", "elected") | ("queue", "claimed") => {
            e.detail["lease_id"].as_u64().into_iter().collect()
        }
        ("barrier", "released") | ("double_barrier", "entered" | "released") => {
            ids(&e.detail["leases"]).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// The deadline, in `pre`, of the wait whose end `e` reports for passing it (a lock wait, or
/// the timer of another primitive; a semaphore wait's end has no event).
fn wait_end_deadline(pre: &Sm, e: &Event) -> Option<u64> {
    let lease = e.detail["lease_id"].as_u64()?;
    if (e.kind.as_str(), e.action.as_str()) == ("lock", "wait_expired") {
        let mut waits = pre.wait_expiry.iter();
        return waits
            .find(|(_, n, l)| *n == e.name && *l == lease)
            .map(|w| w.0);
    }
    let timed_out = e.detail["reason"] == "timeout" || e.action == "timeout";
    let kinds = [
        Kind::Barrier,
        Kind::DoubleBarrier,
        Kind::Election,
        Kind::Queue,
        Kind::Condition,
    ];
    let kind = kinds
        .into_iter()
        .find(|k| timed_out && k.as_str() == e.kind)?;
    let mut timers = pre.timers.iter();
    let t = timers.find(|(_, t)| t.kind == kind && t.name == e.name && t.lease_id == lease);
    t.map(|t| t.0)
}

/// Walk the step's events in order, keeping the live leases and a lower bound of the log time
/// (expiry runs in deadline order: a lease or wait deadline reported passed): every grant names
/// a lease alive at that point, whose deadline is after that time. A lease whose deadline has
/// come is dead even if its turn to be ended has not come yet.
fn check_no_dead_grant(c: &Ctx) -> Result<(), String> {
    let floor = match c.term > c.pre.term {
        true => c.now + LEADER_GRACE_MS,
        false => 0,
    };
    let mut alive: BTreeMap<u64, u64> = (c.pre.leases.iter())
        .map(|(id, l)| (*id, l.deadline_ms.max(floor)))
        .collect();
    let mut clock = c.pre.time_ms;
    for e in c.events {
        if e.kind == "lease" {
            let id: u64 = e.name.parse().map_err(|_| format!("lease event {e:?}"))?;
            match e.action.as_str() {
                "expired" => clock = clock.max(alive.remove(&id).unwrap_or(0)),
                "revoked" => {
                    alive.remove(&id);
                    clock = c.now;
                }
                "granted" => {
                    let ttl = e.detail["ttl_ms"].as_u64().unwrap_or(0);
                    alive.insert(id, c.now + ttl);
                    clock = c.now;
                }
                "keepalive" => {
                    alive.insert(id, e.detail["deadline_ms"].as_u64().unwrap_or(0));
                    clock = c.now;
                }
                _ => {}
            }
            continue;
        }
        clock = clock.max(wait_end_deadline(c.pre, e).unwrap_or(0));
        for id in granted_in(e) {
            match alive.get(&id) {
                Some(d) if *d > clock => {}
                d => {
                    return Err(format!(
                        "{} {} {} to lease {id} (deadline {d:?}), dead at {clock}: {:?}",
                        e.kind, e.name, e.action, c.events
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Barriers only advance, by one, and only by releasing every waiter of the generation (after
/// this entry's expiry) plus the arriving lease, `parties` in all, in this step. No lease
/// gains a pass without a release.
fn check_barriers(c: &Ctx) -> Result<bool, String> {
    let mut released = false;
    let barriers = c
        .pre
        .barriers
        .keys()
        .filter(|n| !c.post.barriers.contains_key(*n));
    let doubles =
        (c.pre.double_barriers.keys()).filter(|n| !c.post.double_barriers.contains_key(*n));
    if let Some(name) = barriers.chain(doubles).next() {
        return Err(format!(
            "barrier {name} was removed: its generation would restart"
        ));
    }
    for (name, b) in &c.post.barriers {
        let pre = c.pre.barriers.get(name);
        let g0 = pre.map_or(1, |b| b.generation);
        let passes_kept = b
            .passed
            .iter()
            .all(|(id, p)| pre.and_then(|b| b.passed.get(id)) == Some(p));
        match b.generation.checked_sub(g0) {
            Some(0) if passes_kept => {}
            Some(0) => return Err(format!("barrier {name}: a pass without a release")),
            Some(1) => {
                check_barrier_release(c, name, b, g0)?;
                released |= b.last_release.as_ref().is_some_and(|r| r.parties > 1);
            }
            _ => return Err(format!("barrier {name} went from {g0} to {}", b.generation)),
        }
    }
    Ok(released)
}

fn check_barrier_release(c: &Ctx, name: &str, b: &Barrier, g0: u64) -> Result<(), String> {
    let Command::BarrierWait {
        name: n, lease_id, ..
    } = c.cmd
    else {
        return Err(format!("barrier {name} released by {:?}", c.cmd));
    };
    let Some(r) = b.last_release.as_ref().filter(|_| n == name) else {
        return Err(format!("barrier {name} advanced without a release"));
    };
    let mut expected: BTreeSet<u64> = (c.twin.barriers.get(name))
        .map(|b| b.waiting.keys().copied().collect())
        .unwrap_or_default();
    expected.insert(*lease_id);
    let got: BTreeSet<u64> = r.leases.iter().copied().collect();
    if r.generation != g0 || r.token != c.index || got != expected {
        return Err(format!(
            "barrier {name} released {r:?}, not every waiter of {g0}: {expected:?}"
        ));
    }
    if got.len() as u64 != r.parties || !b.waiting.is_empty() {
        return Err(format!(
            "barrier {name}: release of {r:?} left {:?}",
            b.waiting
        ));
    }
    let pass = BarrierPass {
        generation: g0,
        parties: r.parties,
        token: c.index,
    };
    match got.iter().all(|id| b.passed.get(id) == Some(&pass)) {
        true => Ok(()),
        false => Err(format!(
            "barrier {name}: a released lease has no pass {pass:?}"
        )),
    }
}

/// Double barriers: the whole entry set enters at once, `parties` of them; a generation only
/// advances, by one, by releasing every member that was inside and still is (its lease lives
/// and its leave did not time out), all with one token.
fn check_double_barriers(c: &Ctx) -> Result<(bool, bool), String> {
    let (mut entered, mut released) = (false, false);
    for (name, d) in &c.post.double_barriers {
        let pre = c.pre.double_barriers.get(name);
        entered |= check_entry(c, name, d)?;
        let g0 = pre.map_or(1, |d| d.generation);
        match d.generation.checked_sub(g0) {
            Some(0) => {
                let kept =
                    (d.passed.iter()).all(|(id, p)| pre.and_then(|d| d.passed.get(id)) == Some(p));
                if !kept {
                    return Err(format!("double barrier {name}: a pass without a release"));
                }
            }
            Some(1) => released |= check_leave_release(c, name, d, pre, g0)?,
            _ => {
                return Err(format!(
                    "double barrier {name} went from {g0} to {}",
                    d.generation
                ))
            }
        }
    }
    Ok((entered, released))
}

/// Members admitted in this step: the entering set after expiry plus the arriving lease.
fn check_entry(c: &Ctx, name: &str, d: &DoubleBarrier) -> Result<bool, String> {
    let new: BTreeSet<u64> = (d.inside.iter())
        .filter(|(_, m)| m.token == c.index)
        .map(|(id, _)| *id)
        .collect();
    if new.is_empty() {
        return Ok(false);
    }
    let Command::DoubleBarrierEnter {
        name: n,
        lease_id,
        parties,
        ..
    } = c.cmd
    else {
        return Err(format!("double barrier {name} admitted by {:?}", c.cmd));
    };
    let mut expected: BTreeSet<u64> = (c.twin.double_barriers.get(name))
        .map(|d| d.entering.keys().copied().collect())
        .unwrap_or_default();
    expected.insert(*lease_id);
    if n != name || new != expected || new.len() as u64 != *parties || !d.entering.is_empty() {
        return Err(format!(
            "double barrier {name} admitted {new:?}, the entry set was {expected:?}"
        ));
    }
    Ok(*parties > 1)
}

fn check_leave_release(
    c: &Ctx,
    name: &str,
    d: &DoubleBarrier,
    pre: Option<&DoubleBarrier>,
    g0: u64,
) -> Result<bool, String> {
    let Some(r) = d.last_release.as_ref() else {
        return Err(format!("double barrier {name} advanced without a release"));
    };
    let inside = pre.map(|d| d.inside.clone()).unwrap_or_default();
    let got: BTreeSet<u64> = r.leases.iter().copied().collect();
    if r.generation != g0 || r.token != c.index || got.iter().any(|id| !inside.contains_key(id)) {
        return Err(format!(
            "double barrier {name} released {r:?} of {inside:?}"
        ));
    }
    for (id, m) in &inside {
        let timed_out = m.leaving.as_ref().is_some_and(|w| w.deadline_ms <= c.now);
        let gone = !c.post.leases.contains_key(id) || timed_out;
        if !gone && !got.contains(id) {
            return Err(format!(
                "double barrier {name}: member {id} left behind by {r:?}"
            ));
        }
        let pass = DoubleBarrierPass {
            generation: g0,
            parties: r.parties,
            enter_token: m.token,
            leave_token: c.index,
        };
        if got.contains(id) && c.post.leases.contains_key(id) && d.passed.get(id) != Some(&pass) {
            return Err(format!(
                "double barrier {name}: {id} released without {pass:?}"
            ));
        }
    }
    Ok(!got.is_empty())
}

/// The lease (and its request's priority) whose step may resolve a deadlock.
fn requester(cmd: &Command) -> Option<(u64, u64)> {
    match cmd {
        Command::LockAcquire { lease_id, .. } => Some((*lease_id, 0)),
        Command::SemAcquire {
            lease_id, priority, ..
        } => Some((*lease_id, *priority)),
        _ => None,
    }
}

/// Deadlock refusals and cancelled waits are real cycles and the policy's pick; returns the
/// (refusals, victims) of the step.
fn check_deadlocks(c: &Ctx) -> Result<(u64, u64), String> {
    let here = c.post.deadlocks.iter().filter(|d| d.index == c.index);
    match (c.resp, requester(c.cmd)) {
        _ if c.dup.is_some() => Ok((0, 0)),
        (Response::Rejected(rej), Some((v, priority))) if rej.code == ErrorCode::Deadlock => {
            check_deadlock_refusal(c.twin, c.post, v, rej)?;
            match expected_victim(c.twin, &rej.cycle, v, priority) {
                w if w == v => Ok((1, 0)),
                w => Err(format!("the policy picks {w}, but {v} was refused")),
            }
        }
        (_, Some((v, priority))) => {
            let victims = check_victims(c.twin, c.post, v, priority, c.index)?;
            Ok((0, victims.len() as u64))
        }
        // A woken lease re-queues for its lock like an acquire: that may close a cycle.
        (Response::CondNotified { woken }, None) => {
            let records: Vec<&DeadlockRecord> = here.collect();
            let by_woken = |d: &&DeadlockRecord| d.requester.is_some_and(|r| woken.contains(&r));
            if !records.iter().all(by_woken) {
                return Err(format!("a notify resolved another's deadlock: {records:?}"));
            }
            let refusals = records.iter().filter(|d| d.requester == Some(d.victim));
            let refusals = refusals.count() as u64;
            Ok((refusals, records.len() as u64 - refusals))
        }
        _ => match here.count() {
            0 => Ok((0, 0)),
            _ => Err(format!("{:?} resolved a deadlock", c.cmd)),
        },
    }
}

/// A retried request answers as the first time and changes nothing but the expiry; so does a
/// rejected command (deadlock refusals are checked against the graph instead).
fn check_nothing_applied(c: &Ctx) -> Result<(), String> {
    if let Some(first) = &c.dup {
        if first != c.resp {
            return Err(format!("retry answered {:?}, first {first:?}", c.resp));
        }
    }
    let rejected = matches!(c.resp, Response::Rejected(r) if r.code != ErrorCode::Deadlock);
    if (c.dup.is_some() || rejected) && c.post != c.twin {
        return Err(format!(
            "{:?} answered {:?} but changed the state",
            c.cmd, c.resp
        ));
    }
    Ok(())
}

/// Grant responses agree with the state they leave (a retry's first answer may be old).
fn check_response(c: &Ctx) -> Result<(), String> {
    let ok = match (c.cmd, c.resp) {
        _ if c.dup.is_some() => true,
        (Command::LockAcquire { name, lease_id, .. }, Response::LockGranted { token }) => {
            let hold = c.post.locks.get(name).and_then(|l| l.hold_of(*lease_id));
            hold.is_some_and(|(_, h)| h.token == *token)
        }
        (Command::LockAcquire { name, lease_id, .. }, Response::LockQueued { position }) => {
            let queue = c.post.locks.get(name).map(|l| &l.queue);
            let at = queue.and_then(|q| q.get((*position as usize).wrapping_sub(1)));
            at.is_some_and(|w| w.lease_id == *lease_id)
        }
        (
            Command::LockRelease { name, .. },
            Response::LockReleased {
                next_holder: Some(n),
            },
        ) => {
            let hold = c.post.locks.get(name).and_then(|l| l.hold_of(*n));
            hold.is_some_and(|(_, h)| h.token == c.index)
        }
        (Command::SemAcquire { name, lease_id, .. }, Response::SemGranted { token }) => {
            let hold = c
                .post
                .semaphores
                .get(name)
                .and_then(|s| s.holders.get(lease_id));
            hold.is_some_and(|h| h.token == *token)
        }
        (Command::ElectionCampaign { name, .. }, Response::Elected { leader, token, .. })
        | (
            Command::ElectionResign { name, .. },
            Response::Resigned {
                next_leader: Some(leader),
                token: Some(token),
                ..
            },
        ) => {
            let l = c.post.elections.get(name).map(|e| &e.leader);
            l.is_some_and(|l| (l.lease_id, l.token) == (*leader, *token))
        }
        (Command::QueueClaim { name, lease_id, .. }, Response::QueueClaimed { id, token, .. }) => {
            let claim = c.post.queues.get(name).and_then(|q| q.claimed.get(id));
            claim.is_some_and(|cl| (cl.lease_id, cl.token) == (*lease_id, *token))
        }
        _ => true,
    };
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{:?} answered {:?}, the state disagrees",
            c.cmd, c.resp
        )),
    }
}

/// Does `lease` wait for anything in `sm` (a lock, permits, leadership, an item, a barrier,
/// a double barrier entry, a condition)?
fn waits_anywhere(sm: &Sm, lease: u64) -> bool {
    let Some(l) = sm.leases.get(&lease) else {
        return false;
    };
    let in_parts = l.parts.iter().any(|(kind, name)| match kind {
        Kind::Barrier => sm
            .barriers
            .get(name)
            .is_some_and(|b| b.waiting.contains_key(&lease)),
        Kind::DoubleBarrier => {
            (sm.double_barriers.get(name)).is_some_and(|d| d.entering.contains_key(&lease))
        }
        Kind::Election => waited(sm, &format!("election:{name}"), lease),
        Kind::Queue => waited(sm, &format!("queue:{name}"), lease),
        Kind::Condition => true,
    });
    !l.waiting.is_empty() || !l.sem_waiting.is_empty() || in_parts
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// One entry of the run's log, for the replay.
#[derive(Debug, Clone)]
enum Logged {
    Normal {
        index: u64,
        term: u64,
        entry: LogEntry,
    },
    Blank {
        index: u64,
    },
}

/// How often each interesting outcome happened across the run.
#[derive(Default)]
struct Outcomes(BTreeMap<&'static str, u64>);

impl Outcomes {
    fn add(&mut self, what: &'static str, n: u64) {
        *self.0.entry(what).or_default() += n;
    }

    fn assert_reached(&self) {
        for what in [
            "lock hand-off",
            "semaphore hand-off",
            "election hand-off",
            "queue hand-off",
            "barrier release",
            "double barrier entry",
            "double barrier release",
            "deadlock refusal",
            "deadlock victim",
            "lease expired while waiting",
            "wait timeout",
            "condition requeue",
            "fenced put",
            "request retried",
            "new term",
            "snapshot",
        ] {
            let n = self.0.get(what).copied().unwrap_or(0);
            assert!(n >= MIN_SEEN, "{what} happened {n} times: {:?}", self.0);
        }
    }
}

/// A request sent with an id, and when it was last applied (not answered from memory).
struct Request {
    id: String,
    cmd: Command,
    applied_ms: Option<u64>,
}

/// The state machine under test, with what the checks remember across steps.
struct Run {
    h: Harness,
    /// A copy restored from the last snapshot, applying the same entries since.
    shadow: Option<Sm>,
    /// The state copied at the last snapshot and its encoding then: the store encodes its
    /// copy after letting go of the state, while entries go on being applied to the state
    /// (the copy shares the big tables until they are written, `sm/cow.rs`).
    image: Option<(SmState, Vec<u8>)>,
    log: Vec<Logged>,
    responses: Vec<Response>,
    /// Every lease ever granted, for stale picks.
    granted: Vec<u64>,
    /// Requests sent with an id, to retry.
    requests: Vec<Request>,
    /// Election time not yet seen by a normal entry.
    election_ms: u64,
    tokens: Tokens,
}

impl Run {
    fn new() -> Run {
        Run {
            h: Harness::with_check(deep_check),
            shadow: None,
            image: None,
            log: Vec::new(),
            responses: Vec::new(),
            granted: Vec::new(),
            requests: Vec::new(),
            election_ms: 0,
            tokens: Tokens::new(),
        }
    }

    fn sm(&self) -> &Sm {
        &self.h.sm
    }

    /// A live lease, or (when `stale`, or none lives) any lease ever granted.
    fn pick(&self, p: &Pick) -> u64 {
        let live: Vec<u64> = self.sm().leases.keys().copied().collect();
        let from = if p.stale || live.is_empty() {
            &self.granted
        } else {
            &live
        };
        match from.is_empty() {
            true => MISSING_LEASE,
            false => from[p.i.index(from.len())],
        }
    }

    fn who(&self, w: &Who, involved: Vec<u64>) -> u64 {
        match w.own && !involved.is_empty() {
            true => involved[w.pick.i.index(involved.len())],
            false => self.pick(&w.pick),
        }
    }

    fn lock_holders(&self, name: &str, exclusive_only: bool) -> Vec<u64> {
        let lock = self.sm().locks.get(name);
        let holders = lock.into_iter().flat_map(|l| l.holders());
        (holders.filter(|(m, _)| !exclusive_only || *m == LockMode::Exclusive))
            .map(|(_, h)| h.lease_id)
            .collect()
    }

    /// Leases that hold or wait on a lock or semaphore other than `res` (`kind:name`), and
    /// neither hold nor wait on `res`.
    fn busy_elsewhere(&self, res: &str) -> Vec<u64> {
        let on = |l: &Lease| {
            let locks = l
                .locks
                .iter()
                .chain(&l.waiting)
                .map(|n| format!("lock:{n}"));
            let sems = (l.sems.iter().chain(&l.sem_waiting)).map(|n| format!("semaphore:{n}"));
            locks.chain(sems).collect::<BTreeSet<String>>()
        };
        (self.sm().leases.values())
            .filter(|l| {
                let on = on(l);
                !on.is_empty() && !on.contains(res)
            })
            .map(|l| l.id)
            .collect()
    }

    fn exclusive_token(&self, name: &str) -> u64 {
        let lock = self.sm().locks.get(name);
        lock.and_then(|l| l.holder.as_ref()).map_or(1, |h| h.token)
    }

    fn election_people(&self, name: &str, leader_only: bool) -> Vec<u64> {
        let Some(e) = self.sm().elections.get(name) else {
            return Vec::new();
        };
        let line = e.candidates.iter().map(|c| c.lease_id);
        let line = line.filter(|_| !leader_only);
        std::iter::once(e.leader.lease_id).chain(line).collect()
    }

    /// The item an ack or nack names, and its claimant if it is claimed.
    fn settle_target(&self, item: &Index) -> (u64, Option<u64>) {
        let q = self.sm().queues.get(QUEUE);
        let claims: Vec<(u64, u64)> = (q.iter())
            .flat_map(|q| q.claimed.values().map(|c| (c.item.id, c.lease_id)))
            .collect();
        match claims.is_empty() {
            true => (
                q.and_then(|q| q.pending.keys().next().copied())
                    .unwrap_or(1),
                None,
            ),
            false => {
                let (id, lease) = claims[item.index(claims.len())];
                (id, Some(lease))
            }
        }
    }

    /// The command `op` makes in the current state (`None` for a leader change).
    fn command(&self, op: &Op) -> Option<Command> {
        let index = self.h.index + 1;
        Some(match op {
            Op::Elect { .. } => return None,
            Op::Grant { ttl_ms } => Command::LeaseGrant {
                ttl_ms: *ttl_ms,
                owner: None,
            },
            Op::KeepAlive { lease } => Command::LeaseKeepAlive {
                lease_id: self.pick(lease),
            },
            Op::Revoke { lease } => Command::LeaseRevoke {
                lease_id: self.pick(lease),
            },
            Op::Tick { .. } => Command::Tick,
            Op::Policy { policy } => Command::SetDeadlockPolicy { policy: *policy },
            Op::Put { key, lease, fence } => Command::KvPut {
                key: KEYS[*key].into(),
                value: format!("v{index}"),
                lease_id: lease.as_ref().map(|p| self.pick(p)),
                if_version: None,
                if_absent: false,
                fence: fence.map(|(lock, back)| Fence {
                    lock: NAMES[lock].into(),
                    token: self.exclusive_token(NAMES[lock]).saturating_sub(back),
                }),
            },
            Op::Delete { key } => Command::KvDelete {
                key: KEYS[*key].into(),
                if_version: None,
            },
            _ => return self.primitive_command(op),
        })
    }

    fn primitive_command(&self, op: &Op) -> Option<Command> {
        let index = self.h.index + 1;
        Some(match op {
            Op::Acquire {
                lock,
                lease,
                wait_ms,
                shared,
            } => Command::LockAcquire {
                name: NAMES[*lock].into(),
                lease_id: self.who(
                    lease,
                    self.busy_elsewhere(&format!("lock:{}", NAMES[*lock])),
                ),
                wait_ms: *wait_ms,
                mode: if *shared {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                },
            },
            Op::Release { lock, lease } => Command::LockRelease {
                name: NAMES[*lock].into(),
                lease_id: self.who(lease, self.lock_holders(NAMES[*lock], false)),
            },
            Op::CondWait {
                lock,
                lease,
                wait_ms,
            } => Command::CondWait {
                name: COND.into(),
                lease_id: self.who(lease, self.lock_holders(NAMES[*lock], true)),
                lock: NAMES[*lock].into(),
                wait_ms: *wait_ms,
            },
            Op::CondNotify { all } => Command::CondNotify {
                name: COND.into(),
                all: *all,
            },
            Op::SemCreate { sem, capacity } => Command::SemCreate {
                name: NAMES[*sem].into(),
                capacity: *capacity,
            },
            Op::SemAcquire {
                sem,
                lease,
                permits,
                wait_ms,
                priority,
            } => Command::SemAcquire {
                name: NAMES[*sem].into(),
                lease_id: self.who(
                    lease,
                    self.busy_elsewhere(&format!("semaphore:{}", NAMES[*sem])),
                ),
                permits: *permits,
                wait_ms: *wait_ms,
                priority: *priority,
            },
            Op::SemRelease { sem, lease } => {
                let holders = self.sm().semaphores.get(NAMES[*sem]);
                let holders = holders.map(|s| s.holders.keys().copied().collect());
                Command::SemRelease {
                    name: NAMES[*sem].into(),
                    lease_id: self.who(lease, holders.unwrap_or_default()),
                }
            }
            Op::Barrier {
                name,
                lease,
                parties,
                wait_ms,
                back,
            } => {
                let open = self
                    .sm()
                    .barriers
                    .get(NAMES[*name])
                    .map_or(1, |b| b.generation);
                let generation = back.map(|b| open.saturating_sub(b));
                barrier_cmd(
                    NAMES[*name],
                    self.pick(lease),
                    *parties,
                    *wait_ms,
                    generation,
                )
            }
            Op::Enter {
                lease,
                parties,
                wait_ms,
            } => db_enter_cmd(DOUBLE, self.pick(lease), *parties, *wait_ms),
            Op::Leave { lease, wait_ms } => {
                let d = self.sm().double_barriers.get(DOUBLE);
                let inside = d.map(|d| d.inside.keys().copied().collect());
                db_leave_cmd(
                    DOUBLE,
                    self.who(lease, inside.unwrap_or_default()),
                    None,
                    *wait_ms,
                )
            }
            Op::Campaign {
                name,
                lease,
                wait_ms,
            } => Command::ElectionCampaign {
                name: NAMES[*name].into(),
                lease_id: self.pick(lease),
                value: format!("v{index}"),
                wait_ms: *wait_ms,
            },
            Op::Proclaim { name, lease } => Command::ElectionProclaim {
                name: NAMES[*name].into(),
                lease_id: self.who(lease, self.election_people(NAMES[*name], true)),
                value: format!("v{index}"),
            },
            Op::Resign { name, lease } => Command::ElectionResign {
                name: NAMES[*name].into(),
                lease_id: self.who(lease, self.election_people(NAMES[*name], false)),
            },
            Op::Push { priority } => Command::QueuePush {
                name: QUEUE.into(),
                item: format!("i{index}"),
                priority: *priority,
            },
            Op::Claim { lease, wait_ms } => Command::QueueClaim {
                name: QUEUE.into(),
                lease_id: self.pick(lease),
                wait_ms: *wait_ms,
            },
            Op::Settle { item, ack, lease } => {
                let (id, claimant) = self.settle_target(item);
                let lease_id = self.who(lease, claimant.into_iter().collect());
                let name = QUEUE.into();
                match ack {
                    true => Command::QueueAck { name, lease_id, id },
                    false => Command::QueueNack { name, lease_id, id },
                }
            }
            _ => return None,
        })
    }

    /// The entry of `s` (`None` for a leader change) and, if it carries a request id, the
    /// request's place in `requests`: a new request, or an earlier one sent again.
    fn next_entry(&mut self, s: &Step) -> Option<(LogEntry, Option<usize>)> {
        let cmd = self.command(&s.op)?;
        let jump = match s.op {
            Op::Tick { jump_ms } => jump_ms,
            _ => 0,
        };
        let time_ms = self.sm().time_ms + std::mem::take(&mut self.election_ms) + s.dt + jump;
        let (cmd, at) = match &s.req {
            Req::None => (cmd, None),
            Req::Retry(i) if !self.requests.is_empty() => {
                let at = i.index(self.requests.len());
                (self.requests[at].cmd.clone(), Some(at))
            }
            _ => {
                let id = format!("req-{}", self.h.index + 1);
                let request = Request {
                    id,
                    cmd: cmd.clone(),
                    applied_ms: None,
                };
                self.requests.push(request);
                (cmd, Some(self.requests.len() - 1))
            }
        };
        let request_id = at.map(|i| self.requests[i].id.clone());
        let entry = LogEntry {
            time_ms,
            request_id,
            cmd,
        };
        Some((entry, at))
    }

    /// A leader change: a blank entry in the old term, then a new term for the next entry.
    fn elect(&mut self, election_ms: u64, seen: &mut Outcomes) {
        self.h.index += 1;
        let index = self.h.index;
        self.h.sm.apply_other(index);
        if let Some(s) = &mut self.shadow {
            s.apply_other(index);
        }
        self.log.push(Logged::Blank { index });
        self.h.term += 1;
        self.election_ms += election_ms;
        seen.add("new term", 1);
    }

    /// Apply one step and check everything that must hold after it.
    fn step(&mut self, n: usize, s: &Step, seen: &mut Outcomes) -> Result<(), TestCaseError> {
        if n > 0 && n.is_multiple_of(SNAPSHOT_EVERY) {
            self.snapshot()?;
            seen.add("snapshot", 1);
        }
        let Some((entry, request)) = self.next_entry(s) else {
            if let Op::Elect { election_ms } = s.op {
                self.elect(election_ms, seen);
            }
            return Ok(());
        };
        let (index, term, now) = (self.h.index + 1, self.h.term, entry.time_ms);
        let pre = self.sm().clone();
        let applied = request.and_then(|i| self.requests[i].applied_ms);
        let dup = first_answer(&pre, &entry);
        let remembered = applied.is_some_and(|t| t + DEDUP_RETENTION_MS > now);
        prop_assert_eq!(
            remembered,
            dup.is_some(),
            "request {:?} remembered",
            request
        );
        if let (Some(i), None) = (request, &dup) {
            self.requests[i].applied_ms = Some(now);
        }
        let id = entry.request_id.as_deref();
        let resp = self.h.apply_req(entry.time_ms, id, entry.cmd.clone());
        let events = self.h.sm.take_events();
        let twin = twin_of(&pre, index, term, &entry, &resp, dup.is_some());
        let c = Ctx {
            cmd: &entry.cmd,
            resp: &resp,
            pre: &pre,
            twin: &twin,
            post: &self.h.sm,
            events: &events,
            index,
            now,
            term,
            dup,
        };
        let counts = check_step(&c, &mut self.tokens)
            .map_err(|e| fail(format!("step {n} at index {index}, {entry:?}: {e}")))?;
        for (what, k) in counts {
            seen.add(what, k);
        }
        self.record(index, term, entry, resp, &events)
    }

    /// Remember what the step did; the restored copy, if any, applies it too.
    fn record(
        &mut self,
        index: u64,
        term: u64,
        entry: LogEntry,
        resp: Response,
        events: &[Event],
    ) -> Result<(), TestCaseError> {
        if let Response::LeaseGranted { lease_id, .. } = resp {
            self.granted.push(lease_id);
        }
        self.follow(index, term, &entry, &resp, events)?;
        self.log.push(Logged::Normal { index, term, entry });
        self.responses.push(resp);
        Ok(())
    }

    /// Round-trip the state the way the store writes snapshots; the restored copy follows the
    /// run from here.
    fn snapshot(&mut self) -> Result<(), TestCaseError> {
        self.check_image()?;
        let st = SmState {
            sm: self.sm().clone(),
            ..SmState::default()
        };
        let bytes = serde_json::to_vec(&st).map_err(fail)?;
        let back: SmState = serde_json::from_slice(&bytes).map_err(fail)?;
        prop_assert_eq!(&back.sm, self.sm(), "snapshot round trip");
        self.shadow = Some(back.sm);
        self.image = Some((st, bytes));
        Ok(())
    }

    /// The last snapshot's copy still encodes to what the state held when it was taken,
    /// whatever was applied since.
    fn check_image(&self) -> Result<(), TestCaseError> {
        if let Some((st, bytes)) = &self.image {
            let now = serde_json::to_vec(st).map_err(fail)?;
            prop_assert!(&now == bytes, "a snapshot copy changed after it was taken");
        }
        Ok(())
    }

    /// The restored copy applies the same entry: same answer, same state, same events.
    fn follow(
        &mut self,
        index: u64,
        term: u64,
        entry: &LogEntry,
        resp: &Response,
        events: &[Event],
    ) -> Result<(), TestCaseError> {
        let Some(s) = &mut self.shadow else {
            return Ok(());
        };
        let r = s.apply(index, term, entry);
        prop_assert_eq!(&r, resp, "the restored copy answers differently");
        prop_assert_eq!(&*s, &self.h.sm, "the restored copy diverged");
        prop_assert_eq!(
            s.take_events(),
            events.to_vec(),
            "the restored copy's events differ"
        );
        Ok(())
    }

    /// Replaying the log on a fresh state machine gives the same answers and state.
    fn check_replay(&self) -> Result<(), TestCaseError> {
        let mut sm = Sm::new();
        let mut responses = Vec::new();
        for l in &self.log {
            match l {
                Logged::Normal { index, term, entry } => {
                    responses.push(sm.apply(*index, *term, entry))
                }
                Logged::Blank { index } => sm.apply_other(*index),
            }
        }
        prop_assert_eq!(&responses, &self.responses, "replay answers differently");
        prop_assert_eq!(&sm, self.sm(), "replay ends in another state");
        Ok(())
    }
}

/// The first answer to `entry`'s request id, if `pre` still remembers it at the entry's time.
fn first_answer(pre: &Sm, entry: &LogEntry) -> Option<Response> {
    let d = pre.dedup.get(entry.request_id.as_ref()?)?;
    let kept = d.time_ms + DEDUP_RETENTION_MS > entry.time_ms.max(pre.time_ms);
    kept.then(|| d.response.clone())
}

/// `pre` after only the grace and expiry of `entry`: a `Tick` at its time in its term, with its
/// request id recorded as answered `resp` (unless it was a duplicate).
fn twin_of(pre: &Sm, index: u64, term: u64, entry: &LogEntry, resp: &Response, dup: bool) -> Sm {
    let mut twin = pre.clone();
    let tick = LogEntry {
        cmd: Command::Tick,
        ..entry.clone()
    };
    twin.apply(index, term, &tick);
    twin.take_events();
    if let (Some(id), false) = (&entry.request_id, dup) {
        if let Some(d) = twin.dedup.get_mut(id) {
            d.response = resp.clone();
        }
    }
    twin
}

/// Every cross-step check of one step; returns what interesting happened in it.
fn check_step(c: &Ctx, tokens: &mut Tokens) -> Result<Vec<(&'static str, u64)>, String> {
    check_nothing_applied(c)?;
    check_response(c)?;
    check_no_dead_grant(c)?;
    let mut seen = Vec::new();
    for kind in check_tokens(c, tokens)? {
        seen.push((hand_off(&kind), 1));
    }
    seen.push(("barrier release", u64::from(check_barriers(c)?)));
    let (entered, released) = check_double_barriers(c)?;
    seen.push(("double barrier entry", u64::from(entered)));
    seen.push(("double barrier release", u64::from(released)));
    let (refusals, victims) = check_deadlocks(c)?;
    seen.push(("deadlock refusal", refusals));
    seen.push(("deadlock victim", victims));
    seen.extend(note_expiry(c));
    Ok(seen)
}

fn hand_off(kind: &str) -> &'static str {
    match kind {
        "lock" => "lock hand-off",
        "semaphore" => "semaphore hand-off",
        "election" => "election hand-off",
        _ => "queue hand-off",
    }
}

/// Outcomes of the step that need no check of their own: leases that expired while waiting,
/// waits that timed out, condition re-queues, fenced puts and retried requests.
fn note_expiry(c: &Ctx) -> Vec<(&'static str, u64)> {
    let expired = (c.pre.leases.keys())
        .filter(|id| !c.twin.leases.contains_key(id) && waits_anywhere(c.pre, **id))
        .count() as u64;
    // Through the lookup `check_no_dead_grant` uses, so that it is seen to work.
    let timeouts = (c.events.iter())
        .filter(|e| wait_end_deadline(c.pre, e).is_some_and(|d| d <= c.now))
        .count() as u64;
    let requeued = matches!(c.resp, Response::CondNotified { woken } if !woken.is_empty());
    let fenced = matches!(
        (c.cmd, c.resp),
        (
            Command::KvPut { fence: Some(_), .. },
            Response::KvPut { .. }
        )
    );
    vec![
        ("lease expired while waiting", expired),
        ("wait timeout", timeouts),
        ("condition requeue", u64::from(requeued)),
        ("fenced put", u64::from(fenced)),
        ("request retried", u64::from(c.dup.is_some())),
    ]
}

fn run_case(steps: &[Step], seen: &mut Outcomes) -> Result<(), TestCaseError> {
    let mut run = Run::new();
    for (n, s) in steps.iter().enumerate() {
        run.step(n, s, seen)?;
    }
    run.check_image()?;
    run.check_replay()?;
    run.h.assert_round_trip();
    Ok(())
}

/// Random interleavings of every command keep every property in the module docs, and reach
/// every interesting outcome.
#[test]
fn random_interleavings_of_all_commands_keep_every_property() {
    let seen = RefCell::new(Outcomes::default());
    let config = ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&steps(), |steps| run_case(&steps, &mut seen.borrow_mut()));
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("outcomes: {:?}", seen.0);
    seen.assert_reached();
}

// ---------------------------------------------------------------------------------------------
// A lease is dead from the instant it is due (found by the property test)
// ---------------------------------------------------------------------------------------------

/// Every lease the grant events of `events` name, in order.
fn grants(events: &[Event]) -> Vec<u64> {
    events.iter().flat_map(granted_in).collect()
}

/// Leases due at 1 000 (the first two) and much later (the third).
fn three_leases(h: &mut Harness) -> [u64; 3] {
    [h.grant(0, 1_000), h.grant(0, 1_000), h.grant(0, 60_000)]
}

fn lock_x(lease_id: u64, wait_ms: u64) -> Command {
    Command::LockAcquire {
        name: "x".into(),
        lease_id,
        wait_ms,
        mode: LockMode::Exclusive,
    }
}

/// After a leader change the grace gives every short lease the same deadline: the holder of a
/// lock and its first waiter then expire together, and the lock goes to the live waiter behind
/// them, the only grant of the step (before the fix the dead waiter was granted it first).
#[test]
fn a_lock_of_leases_due_together_goes_only_to_a_live_waiter() {
    let mut h = Harness::with_check(deep_check);
    let (a, b, c) = (h.grant(0, 1_000), h.grant(0, 1_500), h.grant(0, 60_000));
    for (lease, wait_ms) in [(a, 0), (b, 60_000), (c, 60_000)] {
        h.apply(0, lock_x(lease, wait_ms));
    }
    h.term += 1;
    h.tick(900);
    assert_eq!(h.sm.leases[&a].deadline_ms, h.sm.leases[&b].deadline_ms);
    h.sm.take_events();
    let idx = h.tick(3_000);
    let holder = h.sm.locks["x"].holder.as_ref();
    assert_eq!(holder.map(|x| (x.lease_id, x.token)), Some((c, idx)));
    assert_eq!(grants(&h.sm.take_events()), vec![c]);
}

#[test]
fn permits_of_leases_due_together_go_only_to_a_live_waiter() {
    let mut h = Harness::with_check(deep_check);
    let [a, b, c] = three_leases(&mut h);
    let name = || "s".to_string();
    h.apply(
        0,
        Command::SemCreate {
            name: name(),
            capacity: 1,
        },
    );
    for (lease_id, wait_ms) in [(a, 0), (b, 60_000), (c, 60_000)] {
        let (permits, priority) = (1, 0);
        h.apply(
            0,
            Command::SemAcquire {
                name: name(),
                lease_id,
                permits,
                wait_ms,
                priority,
            },
        );
    }
    h.sm.take_events();
    let idx = h.tick(1_000);
    let holders = &h.sm.semaphores["s"].holders;
    let holders: Vec<(u64, u64)> = holders.iter().map(|(id, x)| (*id, x.token)).collect();
    assert_eq!(holders, vec![(c, idx)]);
    assert_eq!(grants(&h.sm.take_events()), vec![c]);
}

#[test]
fn an_election_whose_leader_and_first_candidate_are_due_together_elects_a_live_one() {
    let mut h = Harness::with_check(deep_check);
    let [a, b, c] = three_leases(&mut h);
    for lease_id in [a, b, c] {
        let (name, value, wait_ms) = ("e".into(), format!("v{lease_id}"), 60_000);
        h.apply(
            0,
            Command::ElectionCampaign {
                name,
                lease_id,
                value,
                wait_ms,
            },
        );
    }
    h.sm.take_events();
    let idx = h.tick(1_000);
    let e = &h.sm.elections["e"];
    assert_eq!((e.leader.lease_id, e.leader.token), (c, idx));
    assert!(e.candidates.is_empty());
    assert_eq!(grants(&h.sm.take_events()), vec![c]);
}

#[test]
fn the_item_of_a_claimant_due_with_the_first_waiter_goes_to_a_live_one() {
    let mut h = Harness::with_check(deep_check);
    let [a, b, c] = three_leases(&mut h);
    let (name, item, priority) = (QUEUE.to_string(), "i".to_string(), 0);
    h.apply(
        0,
        Command::QueuePush {
            name: name.clone(),
            item,
            priority,
        },
    );
    for lease_id in [a, b, c] {
        let (name, wait_ms) = (name.clone(), 60_000);
        h.apply(
            0,
            Command::QueueClaim {
                name,
                lease_id,
                wait_ms,
            },
        );
    }
    h.sm.take_events();
    let idx = h.tick(1_000);
    let q = &h.sm.queues[QUEUE];
    let claims: Vec<(u64, u64)> = q.claimed.values().map(|x| (x.lease_id, x.token)).collect();
    assert_eq!(claims, vec![(c, idx)]);
    assert!(q.waiters.is_empty());
    assert_eq!(grants(&h.sm.take_events()), vec![c]);
}

/// A member that has not left and a leaving one expire together: both count as having left,
/// and only the live leaving member is released.
#[test]
fn a_double_barrier_releases_only_live_members_when_members_are_due_together() {
    let mut h = Harness::with_check(deep_check);
    let [x, y, z] = three_leases(&mut h);
    for lease in [x, y, z] {
        h.apply(0, db_enter_cmd(DOUBLE, lease, 3, 60_000));
    }
    for lease in [y, z] {
        h.apply(0, db_leave_cmd(DOUBLE, lease, None, 60_000));
    }
    h.sm.take_events();
    let idx = h.tick(1_000);
    let d = &h.sm.double_barriers[DOUBLE];
    let release = d.last_release.as_ref();
    let release = release.map(|r| (r.generation, r.token, r.leases.clone()));
    assert_eq!(release, Some((1, idx, vec![z])));
    assert_eq!(d.passed.keys().copied().collect::<Vec<_>>(), vec![z]);
    assert_eq!(grants(&h.sm.take_events()), vec![z]);
}

/// A wait that ends at the instant a lease is due hands nothing to that lease: the head waiter
/// of a semaphore gives up at 1 000, when the lease behind it ends.
#[test]
fn a_wait_ending_when_the_next_waiters_lease_is_due_hands_it_nothing() {
    let mut h = Harness::with_check(deep_check);
    let (a, w, l) = (h.grant(0, 60_000), h.grant(0, 60_000), h.grant(0, 1_000));
    let name = || "s".to_string();
    h.apply(
        0,
        Command::SemCreate {
            name: name(),
            capacity: 2,
        },
    );
    for (lease_id, permits, wait_ms) in [(a, 1, 0), (w, 2, 1_000), (l, 1, 60_000)] {
        let priority = 0;
        h.apply(
            0,
            Command::SemAcquire {
                name: name(),
                lease_id,
                permits,
                wait_ms,
                priority,
            },
        );
    }
    h.sm.take_events();
    h.tick(1_000);
    assert_eq!(
        h.sm.semaphores["s"]
            .holders
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(grants(&h.sm.take_events()), Vec::<u64>::new());
}

/// The writer at the head of a lock's queue gives up at 1 000, when the lease of the reader
/// behind it is due: the reader does not join the shared holders.
#[test]
fn a_reader_due_when_the_writer_ahead_gives_up_does_not_join_the_holders() {
    let mut h = Harness::with_check(deep_check);
    let (s, w, r) = (h.grant(0, 60_000), h.grant(0, 60_000), h.grant(0, 1_000));
    for (lease_id, wait_ms, mode) in [
        (s, 0, LockMode::Shared),
        (w, 1_000, LockMode::Exclusive),
        (r, 60_000, LockMode::Shared),
    ] {
        let name = "x".into();
        h.apply(
            0,
            Command::LockAcquire {
                name,
                lease_id,
                wait_ms,
                mode,
            },
        );
    }
    h.sm.take_events();
    h.tick(1_000);
    let lock = &h.sm.locks["x"];
    assert_eq!(lock.shared.keys().copied().collect::<Vec<_>>(), vec![s]);
    assert!(lock.queue.is_empty());
    assert_eq!(grants(&h.sm.take_events()), Vec::<u64>::new());
}

//! Tests of leader elections: campaign, proclaim, resign, the FIFO candidate line, hand-off when
//! the leader's lease ends, wait deadlines, bad input, events, snapshots, and property tests
//! over random interleavings (with lease revokes, expiry by ticks and leader changes).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::harness::Harness;
use super::*;

const E: &str = "e";

/// Properties that hold right after every apply, beyond `check_invariants`: nothing live is
/// past its deadline, and every lease in an election lists it in its parts.
pub(super) fn deep_check(sm: &Sm) -> Result<(), String> {
    for (name, e) in &sm.elections {
        for c in &e.candidates {
            if c.deadline_ms <= sm.time_ms {
                return Err(format!(
                    "candidate {} of {name} is past its deadline",
                    c.lease_id
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

fn campaign(h: &mut Harness, t: u64, lease_id: u64, value: &str, wait_ms: u64) -> Response {
    h.apply(
        t,
        Command::ElectionCampaign {
            name: E.into(),
            lease_id,
            value: value.into(),
            wait_ms,
        },
    )
}

fn proclaim(h: &mut Harness, t: u64, lease_id: u64, value: &str) -> Response {
    h.apply(
        t,
        Command::ElectionProclaim {
            name: E.into(),
            lease_id,
            value: value.into(),
        },
    )
}

fn resign(h: &mut Harness, t: u64, lease_id: u64) -> Response {
    h.apply(
        t,
        Command::ElectionResign {
            name: E.into(),
            lease_id,
        },
    )
}

fn leader(h: &Harness) -> Option<(u64, u64, String)> {
    h.sm.elections
        .get(E)
        .map(|e| (e.leader.lease_id, e.leader.token, e.leader.value.clone()))
}

fn line(h: &Harness) -> Vec<u64> {
    h.sm.elections
        .get(E)
        .map(|e| e.candidates.iter().map(|c| c.lease_id).collect())
        .unwrap_or_default()
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Rejected(x) => x.code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// A harness with leases a, b, c (TTL 10 s) and `a` leading with value "A".
fn led() -> (Harness, u64, u64, u64) {
    let mut h = h();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    let c = h.grant(0, 10_000);
    let r = campaign(&mut h, 0, a, "A", 0);
    assert_eq!(
        r,
        Response::Elected {
            leader: a,
            value: "A".into(),
            token: h.index,
            since_ms: 0
        }
    );
    (h, a, b, c)
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

#[test]
fn first_campaign_leads_at_once_with_the_entry_index_as_token() {
    let mut h = h();
    let a = h.grant(5, 10_000);
    h.sm.take_events_of("election");
    let r = campaign(&mut h, 7, a, "host-a", 60_000);
    let idx = h.index;
    assert_eq!(
        r,
        Response::Elected {
            leader: a,
            value: "host-a".into(),
            token: idx,
            since_ms: 7
        }
    );
    assert_eq!(leader(&h), Some((a, idx, "host-a".into())));
    assert!(line(&h).is_empty());
    assert!(h.sm.leases[&a].parts.contains(&(Kind::Election, E.into())));
    assert_eq!(h.sm.next_deadline(), Some(10_005));
    let ev = h.sm.take_events_of("election");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind.as_str(), ev[0].action.as_str(), ev[0].revision),
        ("election", "elected", idx)
    );
    assert_eq!(ev[0].detail["lease_id"], a);
    assert_eq!(ev[0].detail["token"], idx);
}

#[test]
fn campaigning_again_while_leading_is_idempotent() {
    let (mut h, a, _, _) = led();
    let before = h.sm.elections.clone();
    let token = leader(&h).unwrap().1;
    h.sm.take_events_of("election");
    let r = campaign(&mut h, 50, a, "other value", 1_000);
    assert_eq!(
        r,
        Response::Elected {
            leader: a,
            value: "A".into(),
            token,
            since_ms: 0
        }
    );
    assert_eq!(h.sm.elections, before);
    assert!(h.sm.take_events_of("election").is_empty());
}

#[test]
fn try_campaign_against_a_leader_is_lock_held_and_changes_nothing() {
    let (mut h, a, b, _) = led();
    let token = leader(&h).unwrap().1;
    let before = h.sm.clone();
    let r = campaign(&mut h, 10, b, "B", 0);
    match &r {
        Response::Rejected(x) => {
            assert_eq!(x.code, ErrorCode::LockHeld);
            assert_eq!(x.current_token, Some(token));
            assert!(x.message.contains(&a.to_string()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sm.elections, before.elections);
    assert_eq!(h.sm.leases, before.leases);
    assert_eq!(h.sm.timers, before.timers);
}

#[test]
fn candidates_wait_in_arrival_order_and_a_repeat_resumes_the_same_wait() {
    let (mut h, _, b, c) = led();
    assert_eq!(
        campaign(&mut h, 10, b, "B", 5_000),
        Response::ElectionQueued { position: 1 }
    );
    assert_eq!(
        campaign(&mut h, 20, c, "C", 5_000),
        Response::ElectionQueued { position: 2 }
    );
    assert_eq!(line(&h), vec![b, c]);
    let cand = h.sm.elections[E].candidates[0].clone();
    assert_eq!(
        (cand.since_ms, cand.deadline_ms, cand.value.as_str()),
        (10, 5_010, "B")
    );
    // A repeat (any wait, any value) keeps the place, deadline and value.
    assert_eq!(
        campaign(&mut h, 30, b, "B2", 60_000),
        Response::ElectionQueued { position: 1 }
    );
    assert_eq!(h.sm.elections[E].candidates[0], cand);
    // Even a try by a candidate answers with its place (the API turns it into lock_held).
    assert_eq!(
        campaign(&mut h, 31, c, "C", 0),
        Response::ElectionQueued { position: 2 }
    );
    assert_eq!(h.sm.timers.len(), 2);
    assert!(h.sm.leases[&b].parts.contains(&(Kind::Election, E.into())));
}

#[test]
fn resign_hands_leadership_to_the_first_candidate_in_the_same_step() {
    let (mut h, a, b, c) = led();
    let t0 = leader(&h).unwrap().1;
    campaign(&mut h, 10, b, "B", 5_000);
    campaign(&mut h, 20, c, "C", 5_000);
    h.sm.take_events_of("election");
    let r = resign(&mut h, 30, a);
    let idx = h.index;
    assert_eq!(
        r,
        Response::Resigned {
            was_leader: true,
            next_leader: Some(b),
            token: Some(idx)
        }
    );
    assert!(idx > t0);
    assert_eq!(leader(&h), Some((b, idx, "B".into())));
    assert_eq!(h.sm.elections[E].leader.since_ms, 30);
    assert_eq!(line(&h), vec![c]);
    assert!(!h.sm.leases[&a].parts.contains(&(Kind::Election, E.into())));
    assert_eq!(h.sm.timers.len(), 1);
    let actions: Vec<_> =
        h.sm.take_events_of("election")
            .into_iter()
            .map(|e| e.action)
            .collect();
    assert_eq!(actions, vec!["resigned", "elected"]);
    // The last one resigns: the election is gone.
    resign(&mut h, 40, b);
    assert_eq!(leader(&h).unwrap().0, c);
    let r = resign(&mut h, 50, c);
    assert_eq!(
        r,
        Response::Resigned {
            was_leader: true,
            next_leader: None,
            token: None
        }
    );
    assert!(h.sm.elections.is_empty());
    assert!(h.sm.timers.is_empty());
    assert!(h.sm.leases.values().all(|l| l.parts.is_empty()));
}

#[test]
fn a_candidate_resigning_leaves_the_line() {
    let (mut h, a, b, c) = led();
    campaign(&mut h, 10, b, "B", 5_000);
    campaign(&mut h, 20, c, "C", 5_000);
    let r = resign(&mut h, 30, b);
    assert_eq!(
        r,
        Response::Resigned {
            was_leader: false,
            next_leader: None,
            token: None
        }
    );
    assert_eq!(line(&h), vec![c]);
    assert_eq!(leader(&h).unwrap().0, a);
    assert!(h.sm.leases[&b].parts.is_empty());
    assert_eq!(h.sm.timers.len(), 1);
}

#[test]
fn resign_or_proclaim_by_a_non_leader_is_conflict_and_changes_nothing() {
    let (mut h, _, b, c) = led();
    campaign(&mut h, 10, c, "C", 5_000);
    let before = h.sm.clone();
    assert_eq!(code(&resign(&mut h, 20, b)), ErrorCode::Conflict);
    assert_eq!(code(&proclaim(&mut h, 20, b, "x")), ErrorCode::Conflict);
    // A candidate is not the leader either.
    assert_eq!(code(&proclaim(&mut h, 20, c, "x")), ErrorCode::Conflict);
    // Unknown election.
    let r = h.apply(
        20,
        Command::ElectionResign {
            name: "nope".into(),
            lease_id: b,
        },
    );
    assert_eq!(code(&r), ErrorCode::Conflict);
    assert_eq!(code(&resign(&mut h, 20, 999)), ErrorCode::LeaseNotFound);
    assert_eq!(
        code(&proclaim(&mut h, 20, 999, "x")),
        ErrorCode::LeaseNotFound
    );
    assert_eq!(
        code(&campaign(&mut h, 20, 999, "x", 0)),
        ErrorCode::LeaseNotFound
    );
    assert_eq!(h.sm.elections, before.elections);
    assert_eq!(h.sm.leases, before.leases);
    assert_eq!(h.sm.timers, before.timers);
}

#[test]
fn proclaim_replaces_the_leaders_value_and_keeps_its_token() {
    let (mut h, a, _, _) = led();
    let token = leader(&h).unwrap().1;
    h.sm.take_events_of("election");
    assert_eq!(
        proclaim(&mut h, 10, a, "A2"),
        Response::Proclaimed { token }
    );
    assert_eq!(leader(&h), Some((a, token, "A2".into())));
    let ev = h.sm.take_events_of("election");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].action, "proclaimed");
    assert_eq!(ev[0].detail["value"], "A2");
}

#[test]
fn bad_input_is_rejected_with_a_stable_code_and_changes_nothing() {
    let (mut h, a, b, _) = led();
    let before = h.sm.clone();
    let big = "x".repeat(MAX_ELECTION_VALUE + 1);
    assert_eq!(
        code(&campaign(&mut h, 1, b, &big, 1_000)),
        ErrorCode::PayloadTooLarge
    );
    assert_eq!(
        code(&proclaim(&mut h, 1, a, &big)),
        ErrorCode::PayloadTooLarge
    );
    assert_eq!(
        code(&campaign(&mut h, 1, b, "B", MAX_WAIT_MS + 1)),
        ErrorCode::InvalidArgument
    );
    let r = h.apply(
        1,
        Command::ElectionCampaign {
            name: String::new(),
            lease_id: b,
            value: String::new(),
            wait_ms: 0,
        },
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    let r = h.apply(
        1,
        Command::ElectionResign {
            name: String::new(),
            lease_id: a,
        },
    );
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    assert_eq!(h.sm.elections, before.elections);
    assert_eq!(h.sm.leases, before.leases);
    assert_eq!(h.sm.timers, before.timers);
    // The largest value is fine.
    let max = "y".repeat(MAX_ELECTION_VALUE);
    assert!(matches!(
        proclaim(&mut h, 2, a, &max),
        Response::Proclaimed { .. }
    ));
}

#[test]
fn revoking_the_leaders_lease_elects_the_next_candidate_in_that_step() {
    let (mut h, a, b, c) = led();
    campaign(&mut h, 10, b, "B", 5_000);
    campaign(&mut h, 20, c, "C", 5_000);
    h.sm.take_events_of("election");
    h.revoke(30, a);
    let idx = h.index;
    assert_eq!(leader(&h), Some((b, idx, "B".into())));
    assert_eq!(line(&h), vec![c]);
    let ev = h.sm.take_events_of("election");
    let actions: Vec<_> = ev.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, vec!["resigned", "elected"]);
    assert_eq!(ev[0].detail["reason"], "lease_ended");
}

#[test]
fn an_expiring_leader_is_replaced_by_the_tick_that_ends_it() {
    let mut h = h();
    let a = h.grant(0, 1_000);
    let b = h.grant(0, 60_000);
    campaign(&mut h, 0, a, "A", 0);
    campaign(&mut h, 0, b, "B", 30_000);
    h.tick(999);
    assert_eq!(leader(&h).unwrap().0, a);
    let idx = h.tick(1_000);
    assert!(!h.sm.leases.contains_key(&a));
    assert_eq!(leader(&h), Some((b, idx, "B".into())));
    assert!(line(&h).is_empty());
    assert!(h.sm.timers.is_empty());
}

#[test]
fn a_candidate_leaves_at_its_wait_deadline_and_is_never_elected_after() {
    let (mut h, a, b, c) = led();
    campaign(&mut h, 0, b, "B", 100);
    campaign(&mut h, 0, c, "C", 5_000);
    h.sm.take_events_of("election");
    h.tick(100);
    assert_eq!(line(&h), vec![c]);
    assert!(h.sm.leases[&b].parts.is_empty());
    let ev = h.sm.take_events_of("election");
    assert_eq!(
        (ev[0].action.as_str(), &ev[0].detail["reason"]),
        ("left", &serde_json::json!("timeout"))
    );
    resign(&mut h, 200, a);
    assert_eq!(leader(&h).unwrap().0, c);
}

#[test]
fn a_candidate_whose_lease_ended_is_skipped() {
    let mut h = h();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 1_000);
    let c = h.grant(0, 10_000);
    campaign(&mut h, 0, a, "A", 0);
    campaign(&mut h, 0, b, "B", 60_000);
    campaign(&mut h, 0, c, "C", 60_000);
    h.tick(1_000);
    assert_eq!(line(&h), vec![c]);
    let r = resign(&mut h, 1_001, a);
    assert_eq!(
        r,
        Response::Resigned {
            was_leader: true,
            next_leader: Some(c),
            token: Some(h.index)
        }
    );
}

#[test]
fn leader_and_first_candidate_expiring_in_one_step_leaves_the_live_one_leading() {
    let mut h = h();
    let a = h.grant(0, 1_000);
    let b = h.grant(0, 1_500);
    let c = h.grant(0, 60_000);
    campaign(&mut h, 0, a, "A", 0);
    campaign(&mut h, 0, b, "B", 60_000);
    campaign(&mut h, 0, c, "C", 60_000);
    h.sm.take_events_of("election");
    // One tick past both deadlines: a ends (b elected), then b ends (c elected).
    let idx = h.tick(2_000);
    assert_eq!(leader(&h), Some((c, idx, "C".into())));
    assert!(line(&h).is_empty());
    let elected: Vec<_> =
        h.sm.take_events_of("election")
            .into_iter()
            .filter(|e| e.action == "elected")
            .map(|e| e.detail["lease_id"].as_u64().unwrap())
            .collect();
    assert_eq!(elected, vec![b, c]);
}

#[test]
fn leader_grace_keeps_a_leader_whose_lease_ran_out_during_a_raft_election() {
    let mut h = h();
    let a = h.grant(0, 1_000);
    let b = h.grant(0, 60_000);
    campaign(&mut h, 0, a, "A", 0);
    campaign(&mut h, 0, b, "B", 30_000);
    h.term += 1;
    h.tick(1_500);
    assert_eq!(leader(&h).unwrap().0, a);
    h.tick(1_500 + LEADER_GRACE_MS);
    assert_eq!(leader(&h).unwrap().0, b);
}

#[test]
fn campaign_elections_are_independent_and_a_lease_can_lead_several() {
    let mut h = h();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    for n in ["x", "y"] {
        let r = h.apply(
            0,
            Command::ElectionCampaign {
                name: n.into(),
                lease_id: a,
                value: n.into(),
                wait_ms: 0,
            },
        );
        assert!(matches!(r, Response::Elected { leader, .. } if leader == a));
        let r = h.apply(
            0,
            Command::ElectionCampaign {
                name: n.into(),
                lease_id: b,
                value: n.into(),
                wait_ms: 1_000,
            },
        );
        assert_eq!(r, Response::ElectionQueued { position: 1 });
    }
    let idx = h.index + 1;
    h.revoke(5, a);
    for n in ["x", "y"] {
        assert_eq!(h.sm.elections[n].leader.lease_id, b);
        assert_eq!(h.sm.elections[n].leader.token, idx);
    }
}

#[test]
fn a_retried_campaign_with_the_same_request_id_applies_once() {
    let (mut h, a, b, _) = led();
    let cmd = Command::ElectionCampaign {
        name: E.into(),
        lease_id: b,
        value: "B".into(),
        wait_ms: 5_000,
    };
    let r1 = h.apply_req(10, Some("rq"), cmd.clone());
    resign(&mut h, 20, a);
    // The retry answers the first answer (queued); the wait it names is now the leadership.
    let r2 = h.apply_req(30, Some("rq"), cmd);
    assert_eq!(r1, r2);
    assert_eq!(leader(&h).unwrap().0, b);
}

#[test]
fn snapshot_round_trip_keeps_elections_and_their_timers() {
    let (mut h, _, b, c) = led();
    campaign(&mut h, 10, b, "B", 5_000);
    campaign(&mut h, 20, c, "C", 7_000);
    h.assert_round_trip();
    let json = serde_json::to_string(&h.sm).unwrap();
    let mut back: Sm = serde_json::from_str(&json).unwrap();
    // The restored copy expires the same candidate at the same time.
    let e = LogEntry {
        time_ms: 5_010,
        request_id: None,
        cmd: Command::Tick,
    };
    back.apply(h.index + 1, h.term, &e);
    h.tick(5_010);
    assert_eq!(back, h.sm);
    assert_eq!(line(&h), vec![c]);
}

#[test]
fn snapshots_from_before_elections_still_decode() {
    let mut h = Harness::new();
    let a = h.grant(0, 10_000);
    let mut v = serde_json::to_value(&h.sm).unwrap();
    let obj = v.as_object_mut().unwrap();
    assert!(obj.remove("elections").is_some());
    assert!(obj.remove("queues").is_some());
    let back: Sm = serde_json::from_value(v).unwrap();
    assert!(back.elections.is_empty() && back.queues.is_empty());
    assert_eq!(back, h.sm);
    assert!(back.leases.contains_key(&a));
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

const NAMES: [&str; 2] = ["e0", "e1"];
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
    Campaign {
        e: usize,
        lease: usize,
        wait_ms: u64,
        big: bool,
    },
    Proclaim {
        e: usize,
        lease: usize,
        big: bool,
    },
    Resign {
        e: usize,
        lease: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let lease = 0..SLOTS + 1;
    let e = 0..NAMES.len();
    let wait = prop_oneof![3 => Just(0u64), 5 => 1u64..4_000, 1 => Just(MAX_WAIT_MS + 1)];
    let ttl = prop_oneof![1 => Just(10u64), 6 => MIN_TTL_MS..6_000];
    prop_oneof![
        3 => ttl.prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        3 => lease.clone().prop_map(|lease| Op::KeepAlive { lease }),
        1 => lease.clone().prop_map(|lease| Op::Revoke { lease }),
        3 => Just(Op::Tick),
        1 => Just(Op::NewTerm),
        10 => (e.clone(), lease.clone(), wait, prop::bool::weighted(0.05))
            .prop_map(|(e, lease, wait_ms, big)| Op::Campaign { e, lease, wait_ms, big }),
        3 => (e.clone(), lease.clone(), prop::bool::weighted(0.1))
            .prop_map(|(e, lease, big)| Op::Proclaim { e, lease, big }),
        4 => (e, lease).prop_map(|(e, lease)| Op::Resign { e, lease }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<(u64, Op)>> {
    let dt = prop_oneof![2 => Just(0u64), 5 => 1u64..500, 3 => 500u64..3_000];
    let grants = prop::collection::vec(MIN_TTL_MS..30_000, 4).prop_map(|ttls| {
        ttls.into_iter()
            .map(|ttl_ms| (0, Op::Grant { ttl_ms }))
            .collect()
    });
    (grants, prop::collection::vec((dt, op_strategy()), 1..80)).prop_map(
        |(mut g, rest): (Vec<(u64, Op)>, _)| {
            g.extend(rest);
            g
        },
    )
}

struct Run {
    h: Harness,
    now: u64,
    granted: Vec<u64>,
    /// Last observed (leader, token) per election: tokens must increase when it changes.
    seen: BTreeMap<String, (u64, u64)>,
    responses: Vec<Response>,
}

impl Run {
    fn new() -> Run {
        Run {
            h: h(),
            now: 0,
            granted: Vec::new(),
            seen: BTreeMap::new(),
            responses: Vec::new(),
        }
    }

    /// Slots below `SLOTS` pick a live lease; `SLOTS` the last one granted (maybe dead).
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

    fn value(&self, big: bool) -> String {
        if big {
            "v".repeat(MAX_ELECTION_VALUE + 1)
        } else {
            format!("v{}", self.h.index + 1)
        }
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
            Op::Campaign {
                e,
                lease,
                wait_ms,
                big,
            } => Command::ElectionCampaign {
                name: NAMES[*e].into(),
                lease_id: self.lease(*lease),
                value: self.value(*big),
                wait_ms: *wait_ms,
            },
            Op::Proclaim { e, lease, big } => Command::ElectionProclaim {
                name: NAMES[*e].into(),
                lease_id: self.lease(*lease),
                value: self.value(*big),
            },
            Op::Resign { e, lease } => Command::ElectionResign {
                name: NAMES[*e].into(),
                lease_id: self.lease(*lease),
            },
        })
    }

    fn step(&mut self, dt: u64, op: &Op) -> Result<(), TestCaseError> {
        self.now += dt;
        let Some(cmd) = self.command(op) else {
            return Ok(());
        };
        // The same entry as a Tick: what expiry alone does. A rejected command must leave
        // exactly that state.
        self.h.sm.take_events_of("election");
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
        let pre = self.h.sm.clone();
        let r = self.h.apply(self.now, cmd.clone());
        let idx = self.h.index;
        let events = self.h.sm.take_events_of("election");
        let tick_events = ticked.take_events_of("election");
        let sm = &self.h.sm;
        if matches!(r, Response::Rejected(_)) {
            prop_assert_eq!(sm, &ticked, "rejected {:?} changed the state", cmd);
            prop_assert_eq!(&events, &tick_events, "rejected {:?} emitted events", cmd);
        }
        // Every change the command makes is announced.
        prop_assert_eq!(&events[..tick_events.len()], &tick_events[..]);
        if sm.elections != ticked.elections {
            prop_assert!(
                events.len() > tick_events.len(),
                "{:?} changed elections silently",
                cmd
            );
        }
        if let Response::LeaseGranted { lease_id, .. } = r {
            self.granted.push(lease_id);
        }
        match (&cmd, &r) {
            (
                Command::ElectionCampaign {
                    name,
                    lease_id,
                    value,
                    ..
                },
                Response::Elected { leader, token, .. },
            ) => {
                prop_assert_eq!(leader, lease_id);
                let e = &sm.elections[name];
                prop_assert_eq!((e.leader.lease_id, e.leader.token), (*leader, *token));
                // Elected by its own campaign: it leads with that campaign's value.
                let was_candidate = ticked.elections.get(name).is_some_and(|e| {
                    e.leader.lease_id == *lease_id
                        || e.candidates.iter().any(|c| c.lease_id == *lease_id)
                });
                if !was_candidate {
                    prop_assert_eq!(*token, idx);
                    prop_assert_eq!(&e.leader.value, value);
                }
            }
            (
                Command::ElectionCampaign { name, lease_id, .. },
                Response::ElectionQueued { position },
            ) => {
                let e = &sm.elections[name];
                prop_assert_eq!(e.candidates[*position as usize - 1].lease_id, *lease_id);
            }
            (
                Command::ElectionProclaim {
                    name,
                    lease_id,
                    value,
                },
                Response::Proclaimed { token },
            ) => {
                let e = &sm.elections[name];
                prop_assert_eq!(
                    (&e.leader.value, e.leader.lease_id, e.leader.token),
                    (value, *lease_id, *token)
                );
            }
            _ => {}
        }
        for name in NAMES {
            let before = ticked.elections.get(name);
            let now = sm.elections.get(name);
            if let Some(e) = now {
                // Leadership is never given to a lease that is not alive.
                prop_assert!(sm.leases.contains_key(&e.leader.lease_id));
                let cur = (e.leader.lease_id, e.leader.token);
                if let Some(prev) = self.seen.get(name) {
                    if *prev != cur {
                        prop_assert!(cur.1 > prev.1, "token went from {:?} to {:?}", prev, cur);
                        prop_assert_eq!(cur.1, idx, "a new leader's token is the entry index");
                    }
                }
                self.seen.insert(name.to_string(), cur);
                // FIFO: a candidate that took over passed nobody still in line. A candidate is
                // its place in line, (lease, seq): one that left in this entry (its wait ended)
                // and campaigned again in the same entry's command is behind, by a new seq.
                let pre_line: Vec<(u64, u64)> = pre
                    .elections
                    .get(name)
                    .map(|e| e.candidates.iter().map(|c| (c.lease_id, c.seq)).collect())
                    .unwrap_or_default();
                match pre_line.iter().position(|l| l.0 == cur.0) {
                    Some(pos) if cur.1 == idx => {
                        for ahead in &pre_line[..pos] {
                            prop_assert!(
                                !e.candidates.iter().any(|c| (c.lease_id, c.seq) == *ahead),
                                "{} elected ahead of {:?} still in line",
                                cur.0,
                                ahead
                            );
                        }
                    }
                    // Not in line before: only its own campaign can have elected it.
                    None if cur.1 == idx => {
                        let own = matches!(&cmd, Command::ElectionCampaign { name: n, lease_id, .. } if n == name && *lease_id == cur.0);
                        prop_assert!(own, "{} elected without being in line", cur.0);
                    }
                    _ => {}
                }
            } else if before.is_some() {
                // It emptied in this entry's command: only by a resign or a lease end.
                let by_command = matches!(
                    cmd,
                    Command::ElectionResign { .. } | Command::LeaseRevoke { .. }
                );
                prop_assert!(by_command, "{} emptied by {:?}", name, cmd);
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
    fn random_interleavings_keep_one_live_leader_and_increasing_tokens(s in steps()) {
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
        b.seen = a.seen.clone();
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

//! Unit and property tests of the state machine. Every test checks the response and the state
//! it leaves behind; every apply in these tests is followed by the structural invariant check.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `check_invariants` plus the properties that only hold right after an apply: nothing live is
/// past its deadline, the reverse links (lease -> waits) agree, tokens and revisions are indexes
/// already applied, and the dedup indexes agree.
pub(super) fn deep_check(sm: &Sm) -> Result<(), String> {
    sm.check_invariants()?;
    for (id, l) in &sm.leases {
        if l.id != *id {
            return Err(format!("lease {id} stored with id {}", l.id));
        }
        if l.deadline_ms <= sm.time_ms {
            return Err(format!(
                "lease {id} is live at {} past its deadline {}",
                sm.time_ms, l.deadline_ms
            ));
        }
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&l.ttl_ms) {
            return Err(format!("lease {id} has ttl {} out of bounds", l.ttl_ms));
        }
        if *id > sm.index {
            return Err(format!(
                "lease {id} is newer than the applied index {}",
                sm.index
            ));
        }
        for name in &l.waiting {
            let queued = sm
                .locks
                .get(name)
                .is_some_and(|k| k.queue.iter().any(|w| w.lease_id == *id));
            if !queued {
                return Err(format!(
                    "lease {id} claims to wait on {name} but is not queued"
                ));
            }
            if l.locks.contains(name) {
                return Err(format!("lease {id} both holds and waits on {name}"));
            }
        }
    }
    for (name, lock) in &sm.locks {
        if let Some(h) = &lock.holder {
            if h.token > sm.index || h.since_ms > sm.time_ms {
                return Err(format!("holder of {name} is from the future: {h:?}"));
            }
        }
        for w in &lock.queue {
            if w.deadline_ms <= sm.time_ms {
                return Err(format!("waiter {w:?} on {name} is past its deadline"));
            }
        }
    }
    for (key, e) in &sm.kv {
        if e.version == 0 || e.create_revision > e.mod_revision || e.mod_revision > sm.index {
            return Err(format!("key {key} has inconsistent versions {e:?}"));
        }
    }
    if sm.dedup.indexed_ids() != sm.dedup.len() {
        return Err("dedup indexes differ in size".into());
    }
    for (t, id) in sm.dedup.by_time() {
        if sm.dedup.get(id).map(|d| d.time_ms) != Some(*t) {
            return Err(format!("dedup time index entry ({t}, {id}) out of sync"));
        }
        if t + DEDUP_RETENTION_MS <= sm.time_ms {
            return Err(format!("request {id} kept past retention"));
        }
    }
    if sm.dedup.len() > DEDUP_MAX_IDS {
        return Err(format!("{} request ids kept", sm.dedup.len()));
    }
    super::harness::check_next_deadline(sm)
}

/// A state machine plus the next log index and the leader term of the next entry; every apply
/// is checked. `h.term += 1` makes the next entry the first of a new leader term.
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
        assert_eq!(self.sm.term, self.term);
        r
    }

    fn apply(&mut self, time_ms: u64, cmd: Command) -> Response {
        self.apply_req(time_ms, None, cmd)
    }

    fn tick(&mut self, time_ms: u64) -> Response {
        let r = self.apply(time_ms, Command::Tick);
        assert_eq!(r, Response::Done);
        r
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

    fn acquire(&mut self, time_ms: u64, name: &str, lease_id: u64, wait_ms: u64) -> Response {
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

    /// Acquire a free lock and check the token is this entry's index.
    fn lock(&mut self, time_ms: u64, name: &str, lease_id: u64) -> u64 {
        let r = self.acquire(time_ms, name, lease_id, 0);
        assert_eq!(r, Response::LockGranted { token: self.index });
        self.index
    }

    fn release(&mut self, time_ms: u64, name: &str, lease_id: u64) -> Response {
        self.apply(
            time_ms,
            Command::LockRelease {
                name: name.into(),
                lease_id,
            },
        )
    }

    fn holder(&self, name: &str) -> Option<(u64, u64)> {
        self.sm
            .locks
            .get(name)
            .and_then(|l| l.holder.as_ref())
            .map(|h| (h.lease_id, h.token))
    }

    fn queue(&self, name: &str) -> Vec<u64> {
        self.sm
            .locks
            .get(name)
            .map(|l| l.queue.iter().map(|w| w.lease_id).collect())
            .unwrap_or_default()
    }
}

fn put(key: &str, value: &str) -> Command {
    Command::KvPut {
        key: key.into(),
        value: value.into(),
        lease_id: None,
        if_version: None,
        if_absent: false,
        fence: None,
    }
}

fn put_if(key: &str, value: &str, if_version: Option<u64>, if_absent: bool) -> Command {
    Command::KvPut {
        key: key.into(),
        value: value.into(),
        lease_id: None,
        if_version,
        if_absent,
        fence: None,
    }
}

fn put_leased(key: &str, value: &str, lease_id: u64) -> Command {
    Command::KvPut {
        key: key.into(),
        value: value.into(),
        lease_id: Some(lease_id),
        if_version: None,
        if_absent: false,
        fence: None,
    }
}

fn put_fenced(key: &str, value: &str, lock: &str, token: u64) -> Command {
    Command::KvPut {
        key: key.into(),
        value: value.into(),
        lease_id: None,
        if_version: None,
        if_absent: false,
        fence: Some(Fence {
            lock: lock.into(),
            token,
        }),
    }
}

fn rejection(r: &Response) -> &Rejection {
    match r {
        Response::Rejected(rej) => rej,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn code(r: &Response) -> ErrorCode {
    rejection(r).code
}

/// `after` is `before` with only the clock, the applied index and the term moved.
fn assert_unchanged(before: &Sm, after: &Sm) {
    let mut expected = before.clone();
    expected.index = after.index;
    expected.time_ms = after.time_ms;
    expected.term = after.term;
    assert_eq!(&expected, after, "a rejected command changed the state");
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

#[test]
fn lease_grant_id_is_entry_index_and_deadline_is_time_plus_ttl() {
    let mut h = H::new();
    h.tick(100);
    let r = h.apply(
        1_000,
        Command::LeaseGrant {
            ttl_ms: 5_000,
            owner: Some("agent-1".into()),
        },
    );
    assert_eq!(
        r,
        Response::LeaseGranted {
            lease_id: 2,
            ttl_ms: 5_000
        }
    );
    let l = &h.sm.leases[&2];
    assert_eq!(
        (l.id, l.ttl_ms, l.granted_ms, l.deadline_ms),
        (2, 5_000, 1_000, 6_000)
    );
    assert_eq!(l.owner.as_deref(), Some("agent-1"));
    assert!(l.locks.is_empty() && l.waiting.is_empty() && l.keys.is_empty());
    assert!(h.sm.lease_expiry.contains(&(6_000, 2)));
    assert_eq!(h.sm.next_deadline(), Some(6_000));

    let second = h.grant(1_000, 2_000);
    assert_eq!(second, 3);
    assert_eq!(h.sm.leases.len(), 2);
    assert_eq!(h.sm.next_deadline(), Some(3_000));
}

#[test]
fn lease_grant_rejects_ttl_out_of_bounds() {
    let mut h = H::new();
    for ttl_ms in [0, 1, MIN_TTL_MS - 1, MAX_TTL_MS + 1, u64::MAX] {
        let before = h.sm.clone();
        let r = h.apply(
            10,
            Command::LeaseGrant {
                ttl_ms,
                owner: None,
            },
        );
        assert_eq!(code(&r), ErrorCode::InvalidArgument, "ttl {ttl_ms}");
        assert_unchanged(&before, &h.sm);
    }
    assert!(h.sm.leases.is_empty());
    assert_eq!(h.sm.next_deadline(), None);

    // Both bounds are inclusive.
    let short = h.grant(10, MIN_TTL_MS);
    let long = h.grant(10, MAX_TTL_MS);
    assert_eq!(h.sm.leases[&short].deadline_ms, 10 + MIN_TTL_MS);
    assert_eq!(h.sm.leases[&long].deadline_ms, 10 + MAX_TTL_MS);
}

#[test]
fn keepalive_extends_deadline() {
    let mut h = H::new();
    let id = h.grant(0, 5_000);
    let r = h.apply(3_000, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(
        r,
        Response::LeaseKept {
            lease_id: id,
            ttl_ms: 5_000
        }
    );
    assert_eq!(h.sm.leases[&id].deadline_ms, 8_000);
    assert!(h.sm.lease_expiry.contains(&(8_000, id)));
    assert!(!h.sm.lease_expiry.contains(&(5_000, id)));

    // The old deadline no longer ends it; the new one does.
    h.tick(5_000);
    assert!(h.sm.leases.contains_key(&id));
    h.tick(7_999);
    assert!(h.sm.leases.contains_key(&id));
    h.tick(8_000);
    assert!(!h.sm.leases.contains_key(&id));
    assert!(h.sm.lease_expiry.is_empty());
}

#[test]
fn keepalive_never_shortens_a_deadline_raised_by_the_leader_grace() {
    // The test needs a TTL shorter than the grace.
    const { assert!(MIN_TTL_MS < LEADER_GRACE_MS) };
    let mut h = H::new();
    let id = h.grant(0, MIN_TTL_MS);
    let kept = Response::LeaseKept {
        lease_id: id,
        ttl_ms: MIN_TTL_MS,
    };
    // The keepalive is the first entry of the new term: the grace runs first, and the keepalive
    // (which alone would give 500 + MIN_TTL_MS) does not take it back.
    h.term += 1;
    let r = h.apply(500, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(r, kept);
    assert_eq!(h.sm.leases[&id].deadline_ms, 500 + LEADER_GRACE_MS);
    let r = h.apply(600, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(r, kept);
    assert_eq!(h.sm.leases[&id].deadline_ms, 500 + LEADER_GRACE_MS);
    assert!(h.sm.lease_expiry.contains(&(500 + LEADER_GRACE_MS, id)));
    assert_eq!(h.sm.lease_expiry.len(), 1);

    // A keepalive that reaches past the grace extends as usual.
    let late = 500 + LEADER_GRACE_MS - 1;
    let r = h.apply(late, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(r, kept);
    assert_eq!(h.sm.leases[&id].deadline_ms, late + MIN_TTL_MS);
}

#[test]
fn keepalive_of_unknown_or_expired_lease_is_lease_not_found() {
    let mut h = H::new();
    let before = h.sm.clone();
    let r = h.apply(0, Command::LeaseKeepAlive { lease_id: 42 });
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert_unchanged(&before, &h.sm);

    // A keepalive stamped at the deadline arrives too late: expiry runs first.
    let id = h.grant(0, 1_000);
    let r = h.apply(1_000, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert!(h.sm.leases.is_empty());
    assert!(h.sm.lease_expiry.is_empty());
}

#[test]
fn lease_expires_exactly_at_its_deadline() {
    let mut h = H::new();
    let id = h.grant(100, 1_000);
    h.tick(1_099);
    assert!(h.sm.leases.contains_key(&id));
    h.tick(1_100);
    assert!(!h.sm.leases.contains_key(&id));
    assert_eq!(h.sm.next_deadline(), None);
}

#[test]
fn revoke_ends_the_lease_once() {
    let mut h = H::new();
    let id = h.grant(0, 10_000);
    let other = h.grant(0, 10_000);
    let r = h.apply(10, Command::LeaseRevoke { lease_id: id });
    assert_eq!(r, Response::LeaseRevoked { lease_id: id });
    assert!(!h.sm.leases.contains_key(&id));
    assert!(h.sm.leases.contains_key(&other));
    assert_eq!(h.sm.next_deadline(), Some(10_000));

    let before = h.sm.clone();
    let r = h.apply(20, Command::LeaseRevoke { lease_id: id });
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert_unchanged(&before, &h.sm);
}

#[test]
fn new_term_grace_raises_short_leases_and_keeps_long_ones() {
    let mut h = H::new();
    let short = h.grant(0, 1_000);
    let long = h.grant(0, 60_000);
    h.term += 1;
    h.tick(500);
    let floor = 500 + LEADER_GRACE_MS;
    assert_eq!(h.sm.term, 2);
    assert_eq!(h.sm.leases[&short].deadline_ms, floor);
    assert_eq!(h.sm.leases[&long].deadline_ms, 60_000);
    assert_eq!(
        h.sm.leases[&short].ttl_ms, 1_000,
        "grace does not change the ttl"
    );
    assert!(h.sm.lease_expiry.contains(&(floor, short)));
    assert!(!h.sm.lease_expiry.contains(&(1_000, short)));
    assert_eq!(h.sm.next_deadline(), Some(floor));

    // Later entries of the same term give no more grace: a lease granted now keeps its TTL.
    let fresh = h.grant(600, 1_000);
    h.tick(1_000);
    assert_eq!(h.sm.leases[&fresh].deadline_ms, 1_600);
    h.tick(1_600);
    assert!(!h.sm.leases.contains_key(&fresh));

    h.tick(floor - 1);
    assert!(h.sm.leases.contains_key(&short));
    h.tick(floor);
    assert!(!h.sm.leases.contains_key(&short));
    assert!(h.sm.leases.contains_key(&long));

    // A new term with more than the grace left on every lease changes nothing.
    h.term += 1;
    let before = h.sm.clone();
    h.tick(6_000);
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.sm.term, 3);
}

#[test]
fn a_lease_granted_by_the_first_entry_of_a_term_gets_its_ttl_not_the_grace() {
    let mut h = H::new();
    let old = h.grant(0, 1_000);
    h.term += 1;
    let new = h.grant(500, 1_000);
    assert_eq!(h.sm.leases[&old].deadline_ms, 500 + LEADER_GRACE_MS);
    assert_eq!(h.sm.leases[&new].deadline_ms, 1_500);
}

/// The grace exists so that leases do not die because keepalives could not be written during an
/// election: it runs before expiry, so a lease whose deadline passed during the election is
/// saved by the first entry of the new leader.
#[test]
fn new_term_grace_saves_leases_whose_deadline_passed_during_the_election() {
    let mut h = H::new();
    let id = h.grant(0, 1_000);
    let other = h.grant(0, 60_000);
    h.lock(0, "L", id);
    h.apply(0, put_leased("k", "v", id));
    // A wait is the client's own timeout: the grace does not extend it.
    assert_eq!(
        h.acquire(0, "L", other, 1_200),
        Response::LockQueued { position: 1 }
    );

    // The same entry without a leader change ends the lease.
    let mut same_term = H {
        sm: h.sm.clone(),
        index: h.index,
        term: h.term,
    };
    same_term.tick(1_500);
    assert!(!same_term.sm.leases.contains_key(&id));

    // The old leader died at ~900; the new one is elected and its first entry is at 1_500.
    h.term += 1;
    h.tick(1_500);
    let l = &h.sm.leases[&id];
    assert_eq!(l.deadline_ms, 1_500 + LEADER_GRACE_MS);
    assert!(l.locks.contains("L") && l.keys.contains("k"));
    assert_eq!(h.holder("L").map(|x| x.0), Some(id));
    assert!(h.sm.kv.contains_key("k"));
    assert!(h.queue("L").is_empty(), "the timed-out wait still ends");
    assert!(h.sm.leases[&other].waiting.is_empty());
    assert_eq!(h.sm.leases[&other].deadline_ms, 60_000);

    // The client's keepalive, once it gets through, extends the lease as usual.
    let r = h.apply(2_000, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(
        r,
        Response::LeaseKept {
            lease_id: id,
            ttl_ms: 1_000
        }
    );
    assert_eq!(h.sm.leases[&id].deadline_ms, 1_500 + LEADER_GRACE_MS);
    h.apply(3_400, Command::LeaseKeepAlive { lease_id: id });
    assert_eq!(h.sm.leases[&id].deadline_ms, 4_400);
}

/// The grace belongs to the entry's term, not its command: a duplicate request or a rejected
/// command that opens a term raises the leases exactly like a `Tick` there would.
#[test]
fn new_term_grace_applies_to_duplicate_and_rejected_entries() {
    let mut h = H::new();
    let grant = Command::LeaseGrant {
        ttl_ms: 1_000,
        owner: None,
    };
    let first = h.apply_req(0, Some("g"), grant.clone());
    let id = h.index;

    h.term += 1;
    let mut ticked = H {
        sm: h.sm.clone(),
        index: h.index,
        term: h.term,
    };
    ticked.tick(500);
    let again = h.apply_req(500, Some("g"), grant);
    assert_eq!(again, first);
    assert_eq!(h.sm.leases.keys().copied().collect::<Vec<_>>(), vec![id]);
    assert_eq!(h.sm.leases[&id].deadline_ms, 500 + LEADER_GRACE_MS);
    assert_eq!(h.sm, ticked.sm);

    h.term += 1;
    let mut ticked = H {
        sm: h.sm.clone(),
        index: h.index,
        term: h.term,
    };
    ticked.tick(2_400);
    let r = h.apply(2_400, Command::LeaseKeepAlive { lease_id: 77 });
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert_eq!(h.sm.leases[&id].deadline_ms, 2_400 + LEADER_GRACE_MS);
    assert_eq!(h.sm, ticked.sm);
}

#[test]
fn new_term_grace_saturates_at_the_end_of_time() {
    let mut h = H::new();
    let end = u64::MAX;
    let id = h.grant(end - MIN_TTL_MS, MIN_TTL_MS);
    assert_eq!(h.sm.leases[&id].deadline_ms, end);
    h.term += 1;
    h.tick(end - 500);
    assert_eq!(h.sm.leases[&id].deadline_ms, end);
    assert_eq!(h.sm.next_deadline(), Some(end));
}

// ---------------------------------------------------------------------------------------------
// KV
// ---------------------------------------------------------------------------------------------

#[test]
fn put_versions_and_revisions_are_log_indexes() {
    let mut h = H::new();
    h.tick(0);
    let r = h.apply(10, put("a", "1"));
    assert_eq!(
        r,
        Response::KvPut {
            version: 1,
            revision: 2
        }
    );
    h.tick(20);
    let r = h.apply(30, put("a", "2"));
    assert_eq!(
        r,
        Response::KvPut {
            version: 2,
            revision: 4
        }
    );
    let e = &h.sm.kv["a"];
    assert_eq!(
        (
            e.value.as_str(),
            e.version,
            e.create_revision,
            e.mod_revision
        ),
        ("2", 2, 2, 4)
    );
    assert_eq!(e.lease_id, None);

    let r = h.apply(40, put("b", "x"));
    assert_eq!(
        r,
        Response::KvPut {
            version: 1,
            revision: 5
        }
    );
    assert_eq!(h.sm.kv.len(), 2);
}

#[test]
fn put_with_empty_key_or_unknown_lease_is_rejected() {
    let mut h = H::new();
    let before = h.sm.clone();
    let r = h.apply(0, put("", "v"));
    assert_eq!(code(&r), ErrorCode::InvalidArgument);
    assert_unchanged(&before, &h.sm);

    let before = h.sm.clone();
    let r = h.apply(0, put_leased("k", "v", 77));
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert_unchanged(&before, &h.sm);
    assert!(h.sm.kv.is_empty());
}

#[test]
fn if_version_cas() {
    let mut h = H::new();
    h.apply(0, put("k", "v1"));
    let r = h.apply(1, put_if("k", "v2", Some(1), false));
    assert_eq!(
        r,
        Response::KvPut {
            version: 2,
            revision: 2
        }
    );

    let before = h.sm.clone();
    let r = h.apply(2, put_if("k", "stale", Some(1), false));
    let rej = rejection(&r);
    assert_eq!(rej.code, ErrorCode::PreconditionFailed);
    assert_eq!(rej.current_version, Some(2));
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.sm.kv["k"].value, "v2");

    // A version on a missing key fails with current_version 0.
    let before = h.sm.clone();
    let r = h.apply(3, put_if("missing", "x", Some(3), false));
    assert_eq!(code(&r), ErrorCode::PreconditionFailed);
    assert_eq!(rejection(&r).current_version, Some(0));
    assert_unchanged(&before, &h.sm);
}

#[test]
fn if_absent_and_if_version_zero_require_a_missing_key() {
    for (if_version, if_absent) in [(None, true), (Some(0), false), (Some(5), true)] {
        let mut h = H::new();
        let r = h.apply(0, put_if("k", "first", if_version, if_absent));
        assert_eq!(
            r,
            Response::KvPut {
                version: 1,
                revision: 1
            },
            "{if_version:?} {if_absent}"
        );
        let before = h.sm.clone();
        let r = h.apply(1, put_if("k", "second", if_version, if_absent));
        let rej = rejection(&r);
        assert_eq!(rej.code, ErrorCode::PreconditionFailed);
        assert_eq!(rej.current_version, Some(1));
        assert_unchanged(&before, &h.sm);
        assert_eq!(h.sm.kv["k"].value, "first");
    }
}

#[test]
fn delete_removes_a_key_and_reports_whether_it_existed() {
    let mut h = H::new();
    h.apply(0, put("k", "v"));
    h.apply(0, put("k", "v2"));

    let before = h.sm.clone();
    let r = h.apply(
        1,
        Command::KvDelete {
            key: "k".into(),
            if_version: Some(1),
        },
    );
    assert_eq!(code(&r), ErrorCode::PreconditionFailed);
    assert_eq!(rejection(&r).current_version, Some(2));
    assert_unchanged(&before, &h.sm);

    let r = h.apply(
        2,
        Command::KvDelete {
            key: "k".into(),
            if_version: Some(2),
        },
    );
    assert_eq!(
        r,
        Response::KvDeleted {
            deleted: true,
            revision: 4
        }
    );
    assert!(!h.sm.kv.contains_key("k"));

    let r = h.apply(
        3,
        Command::KvDelete {
            key: "k".into(),
            if_version: None,
        },
    );
    assert_eq!(
        r,
        Response::KvDeleted {
            deleted: false,
            revision: 5
        }
    );

    // Recreated keys start over at version 1 with a new create revision.
    let r = h.apply(4, put("k", "again"));
    assert_eq!(
        r,
        Response::KvPut {
            version: 1,
            revision: 6
        }
    );
    assert_eq!(h.sm.kv["k"].create_revision, 6);
}

#[test]
fn lease_bound_keys_vanish_when_the_lease_is_revoked() {
    let mut h = H::new();
    let lease = h.grant(0, 10_000);
    h.apply(1, put_leased("bound", "v", lease));
    h.apply(1, put("free", "v"));
    assert_eq!(h.sm.kv["bound"].lease_id, Some(lease));
    assert!(h.sm.leases[&lease].keys.contains("bound"));

    let r = h.apply(2, Command::LeaseRevoke { lease_id: lease });
    assert_eq!(r, Response::LeaseRevoked { lease_id: lease });
    assert!(!h.sm.kv.contains_key("bound"));
    assert!(h.sm.kv.contains_key("free"));
}

#[test]
fn lease_bound_keys_vanish_at_the_first_apply_at_or_after_expiry() {
    let mut h = H::new();
    let lease = h.grant(0, 2_000);
    h.apply(1, put_leased("a", "v", lease));
    h.apply(1, put_leased("b", "v", lease));
    h.tick(1_999);
    assert_eq!(h.sm.kv.len(), 2);
    // Any entry runs expiry first, here a write to another key.
    h.apply(2_000, put("other", "v"));
    assert!(!h.sm.kv.contains_key("a"));
    assert!(!h.sm.kv.contains_key("b"));
    assert!(h.sm.kv.contains_key("other"));
    assert!(h.sm.leases.is_empty());
}

#[test]
fn rebinding_a_key_moves_it_between_leases() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    h.apply(1, put_leased("k", "v1", a));
    h.apply(2, put_leased("k", "v2", b));
    assert!(!h.sm.leases[&a].keys.contains("k"));
    assert!(h.sm.leases[&b].keys.contains("k"));
    assert_eq!(h.sm.kv["k"].version, 2);

    // Revoking the old lease leaves the key alone.
    h.apply(3, Command::LeaseRevoke { lease_id: a });
    assert_eq!(h.sm.kv["k"].value, "v2");

    // A put without a lease unbinds it; then revoking b keeps it too.
    h.apply(4, put("k", "v3"));
    assert_eq!(h.sm.kv["k"].lease_id, None);
    assert!(h.sm.leases[&b].keys.is_empty());
    h.apply(5, Command::LeaseRevoke { lease_id: b });
    assert_eq!(h.sm.kv["k"].value, "v3");

    // Deleting a bound key unbinds it from its lease.
    let c = h.grant(6, 10_000);
    h.apply(7, put_leased("j", "v", c));
    h.apply(
        8,
        Command::KvDelete {
            key: "j".into(),
            if_version: None,
        },
    );
    assert!(h.sm.leases[&c].keys.is_empty());
}

#[test]
fn fenced_put_accepts_only_the_current_holders_token() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    let t1 = h.lock(1, "L", a);
    assert_eq!(t1, 3);

    let r = h.apply(2, put_fenced("k", "by-a", "L", t1));
    assert_eq!(
        r,
        Response::KvPut {
            version: 1,
            revision: 4
        }
    );

    for (lock, token, current) in [("L", t1 + 1, Some(t1)), ("L", 0, Some(t1)), ("M", t1, None)] {
        let before = h.sm.clone();
        let r = h.apply(3, put_fenced("k", "bad", lock, token));
        let rej = rejection(&r);
        assert_eq!(rej.code, ErrorCode::Fenced, "{lock} {token}");
        assert_eq!(rej.current_token, current);
        assert_unchanged(&before, &h.sm);
    }

    assert_eq!(
        h.acquire(4, "L", b, 5_000),
        Response::LockQueued { position: 1 }
    );
    let r = h.release(5, "L", a);
    assert_eq!(
        r,
        Response::LockReleased {
            next_holder: Some(b)
        }
    );
    let t2 = h.index;
    assert_eq!(h.holder("L"), Some((b, t2)));

    // The old holder's token is now stale.
    let before = h.sm.clone();
    let r = h.apply(6, put_fenced("k", "late-a", "L", t1));
    assert_eq!(code(&r), ErrorCode::Fenced);
    assert_eq!(rejection(&r).current_token, Some(t2));
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.sm.kv["k"].value, "by-a");

    let r = h.apply(7, put_fenced("k", "by-b", "L", t2));
    assert!(matches!(r, Response::KvPut { version: 2, .. }), "{r:?}");
    assert_eq!(h.sm.kv["k"].value, "by-b");
    assert_eq!(h.sm.fence_valid("L", t2), (true, Some(t2)));
    assert_eq!(h.sm.fence_valid("L", t1), (false, Some(t2)));
}

// ---------------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------------

#[test]
fn try_lock_on_a_held_lock_is_lock_held_with_the_current_token() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    let token = h.lock(1, "L", a);
    assert!(h.sm.leases[&a].locks.contains("L"));
    assert_eq!(h.sm.locks["L"].holder.as_ref().map(|x| x.since_ms), Some(1));

    let before = h.sm.clone();
    let r = h.acquire(2, "L", b, 0);
    let rej = rejection(&r);
    assert_eq!(rej.code, ErrorCode::LockHeld);
    assert_eq!(rej.current_token, Some(token));
    assert_unchanged(&before, &h.sm);
    assert!(h.queue("L").is_empty());

    // Re-acquiring a held lock is idempotent: same token, nothing changes.
    let before = h.sm.clone();
    assert_eq!(h.acquire(3, "L", a, 0), Response::LockGranted { token });
    assert_unchanged(&before, &h.sm);
}

#[test]
fn acquire_rejects_bad_arguments_and_unknown_leases() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    for (name, lease, wait, want) in [
        ("", a, 0, ErrorCode::InvalidArgument),
        ("L", a, MAX_WAIT_MS + 1, ErrorCode::InvalidArgument),
        ("L", 999, 0, ErrorCode::LeaseNotFound),
        ("L", 999, 1_000, ErrorCode::LeaseNotFound),
    ] {
        let before = h.sm.clone();
        let r = h.acquire(1, name, lease, wait);
        assert_eq!(code(&r), want, "{name:?} {lease} {wait}");
        assert_unchanged(&before, &h.sm);
    }
    assert!(h.sm.locks.is_empty());
    // The longest wait is allowed; a free lock is granted at once whatever the wait.
    assert_eq!(
        h.acquire(2, "L", a, MAX_WAIT_MS),
        Response::LockGranted { token: h.index }
    );
}

#[test]
fn lock_queue_hands_off_fifo_with_the_releasing_entrys_index() {
    let mut h = H::new();
    let a = h.grant(0, 100_000);
    let b = h.grant(0, 100_000);
    let c = h.grant(0, 100_000);
    let t0 = h.lock(1, "L", a);

    assert_eq!(
        h.acquire(2, "L", b, 50_000),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(
        h.acquire(3, "L", c, 50_000),
        Response::LockQueued { position: 2 }
    );
    // Asking again while queued reports the place in line and does not queue twice.
    let before = h.sm.clone();
    assert_eq!(
        h.acquire(4, "L", b, 0),
        Response::LockQueued { position: 1 }
    );
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.queue("L"), vec![b, c]);
    assert!(h.sm.leases[&b].waiting.contains("L"));
    assert_eq!(h.sm.wait_expiry.len(), 2);

    let r = h.release(10, "L", a);
    let t1 = h.index;
    assert_eq!(
        r,
        Response::LockReleased {
            next_holder: Some(b)
        }
    );
    assert!(t1 > t0);
    assert_eq!(h.holder("L"), Some((b, t1)));
    assert_eq!(h.queue("L"), vec![c]);
    assert!(h.sm.leases[&a].locks.is_empty());
    assert!(h.sm.leases[&b].locks.contains("L"));
    assert!(!h.sm.leases[&b].waiting.contains("L"));
    assert_eq!(
        h.sm.locks["L"].holder.as_ref().map(|x| x.since_ms),
        Some(10)
    );

    let r = h.release(11, "L", b);
    let t2 = h.index;
    assert_eq!(
        r,
        Response::LockReleased {
            next_holder: Some(c)
        }
    );
    assert_eq!(h.holder("L"), Some((c, t2)));
    assert!(h.queue("L").is_empty());

    let r = h.release(12, "L", c);
    assert_eq!(r, Response::LockReleased { next_holder: None });
    assert!(!h.sm.locks.contains_key("L"));
    assert!(h.sm.wait_expiry.is_empty());
    assert!(h.sm.leases.values().all(|l| l.locks.is_empty()));

    // A fresh grant gets a token above every earlier one.
    let t3 = h.lock(13, "L", a);
    assert!(t3 > t2);
}

#[test]
fn releasing_a_lock_one_does_not_hold_is_conflict_and_changes_nothing() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    let b = h.grant(0, 10_000);
    let c = h.grant(0, 10_000);
    h.lock(1, "L", a);
    h.acquire(2, "L", b, 5_000);
    for (name, lease) in [("L", b), ("L", c), ("nope", a)] {
        let before = h.sm.clone();
        let r = h.release(3, name, lease);
        assert_eq!(code(&r), ErrorCode::Conflict, "{name} {lease}");
        assert_unchanged(&before, &h.sm);
    }
    let before = h.sm.clone();
    let r = h.release(3, "L", 999);
    assert_eq!(code(&r), ErrorCode::LeaseNotFound);
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.holder("L").map(|x| x.0), Some(a));
    assert_eq!(h.queue("L"), vec![b]);
}

#[test]
fn lock_is_handed_off_when_the_holders_lease_expires() {
    let mut h = H::new();
    let a = h.grant(0, 1_000);
    let b = h.grant(0, 60_000);
    let t0 = h.lock(0, "L", a);
    h.acquire(0, "L", b, 30_000);
    h.tick(999);
    assert_eq!(h.holder("L"), Some((a, t0)));
    h.tick(1_000);
    let tick = h.index;
    assert!(!h.sm.leases.contains_key(&a));
    assert_eq!(h.holder("L"), Some((b, tick)));
    assert!(h.queue("L").is_empty());
    assert_eq!(
        h.sm.locks["L"].holder.as_ref().map(|x| x.since_ms),
        Some(1_000)
    );
    assert!(h.sm.wait_expiry.is_empty());
}

#[test]
fn revoking_the_holder_hands_off_and_drops_its_waits() {
    let mut h = H::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    let c = h.grant(0, 60_000);
    h.lock(0, "L", a);
    h.lock(0, "M", b);
    h.acquire(0, "M", a, 30_000);
    h.acquire(0, "L", c, 30_000);
    h.apply(0, put_leased("k", "v", a));

    let r = h.apply(5, Command::LeaseRevoke { lease_id: a });
    assert_eq!(r, Response::LeaseRevoked { lease_id: a });
    assert_eq!(h.holder("L"), Some((c, h.index)));
    assert!(h.queue("M").is_empty());
    assert!(!h.sm.kv.contains_key("k"));
    // b releases M: nobody is left waiting, so the lock is gone.
    assert_eq!(
        h.release(6, "M", b),
        Response::LockReleased { next_holder: None }
    );
    assert!(!h.sm.locks.contains_key("M"));
}

/// Holder and first waiter expire in the same step; the waiter's lease ends first.
#[test]
fn hand_off_skips_a_waiter_whose_lease_ended_earlier_in_the_same_step() {
    let mut h = H::new();
    let a = h.grant(0, 5_000);
    let b = h.grant(0, 2_000);
    let c = h.grant(0, 60_000);
    h.lock(0, "L", a);
    h.acquire(0, "L", b, 50_000);
    h.acquire(0, "L", c, 50_000);
    h.tick(5_000);
    let tick = h.index;
    assert!(!h.sm.leases.contains_key(&a) && !h.sm.leases.contains_key(&b));
    assert_eq!(h.holder("L"), Some((c, tick)));
    assert!(h.queue("L").is_empty());
    assert_eq!(h.sm.leases[&c].locks.iter().collect::<Vec<_>>(), vec!["L"]);
    assert!(h.sm.leases[&c].waiting.is_empty());
}

/// Holder and first waiter expire in the same step; the holder's lease ends first.
#[test]
fn hand_off_skips_a_waiter_whose_lease_ends_later_in_the_same_step() {
    let mut h = H::new();
    let a = h.grant(0, 2_000);
    let b = h.grant(0, 3_000);
    let c = h.grant(0, 60_000);
    h.lock(0, "L", a);
    h.acquire(0, "L", b, 50_000);
    h.acquire(0, "L", c, 50_000);
    h.tick(3_000);
    let tick = h.index;
    assert_eq!(h.sm.leases.keys().copied().collect::<Vec<_>>(), vec![c]);
    assert_eq!(h.holder("L"), Some((c, tick)));
    assert!(h.queue("L").is_empty());
}

#[test]
fn hand_off_with_only_dead_waiters_frees_the_lock() {
    let mut h = H::new();
    let a = h.grant(0, 2_000);
    let b = h.grant(0, 2_000);
    h.lock(0, "L", a);
    h.acquire(0, "L", b, 50_000);
    h.tick(2_000);
    assert!(h.sm.leases.is_empty());
    assert!(h.sm.locks.is_empty());
    assert!(h.sm.wait_expiry.is_empty() && h.sm.lease_expiry.is_empty());
}

#[test]
fn release_and_revoke_skip_a_waiter_whose_lease_expired_at_that_entry() {
    for revoke in [false, true] {
        let mut h = H::new();
        let a = h.grant(0, 60_000);
        let b = h.grant(0, 2_000);
        let c = h.grant(0, 60_000);
        h.lock(0, "L", a);
        h.acquire(0, "L", b, 50_000);
        h.acquire(0, "L", c, 50_000);
        let r = if revoke {
            h.apply(2_500, Command::LeaseRevoke { lease_id: a })
        } else {
            h.release(2_500, "L", a)
        };
        let expected = if revoke {
            Response::LeaseRevoked { lease_id: a }
        } else {
            Response::LockReleased {
                next_holder: Some(c),
            }
        };
        assert_eq!(r, expected);
        assert!(!h.sm.leases.contains_key(&b));
        assert_eq!(h.holder("L"), Some((c, h.index)));
        assert!(h.queue("L").is_empty());
    }
}

#[test]
fn waiter_is_removed_when_its_wait_deadline_passes() {
    let mut h = H::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 60_000);
    h.lock(0, "L", a);
    assert_eq!(
        h.acquire(100, "L", b, 500),
        Response::LockQueued { position: 1 }
    );
    assert!(h.sm.wait_expiry.contains(&(600, "L".to_string(), b)));
    assert_eq!(h.sm.next_deadline(), Some(600));

    h.tick(599);
    assert_eq!(h.queue("L"), vec![b]);
    h.tick(600);
    assert!(h.queue("L").is_empty());
    assert!(h.sm.leases[&b].waiting.is_empty());
    assert!(h.sm.wait_expiry.is_empty());
    assert_eq!(h.holder("L").map(|x| x.0), Some(a));
    assert_eq!(h.sm.next_deadline(), Some(60_000));

    // The lock is not handed to the timed-out waiter.
    assert_eq!(
        h.release(700, "L", a),
        Response::LockReleased { next_holder: None }
    );
    assert!(h.sm.locks.is_empty());
    assert!(h.sm.leases[&b].locks.is_empty());
}

/// Expiry runs in deadline order across leases and waits. Here the waiter's wait ends at 1_000
/// and the holder's lease at 2_000, but no entry is applied in between: the wait must end first,
/// or the lock would go to a waiter that already gave up and would hold it, unknowingly, for the
/// rest of its lease.
#[test]
fn a_waiter_that_timed_out_is_not_granted_when_the_holder_expires_later() {
    let mut h = H::new();
    let a = h.grant(0, 2_000);
    let b = h.grant(0, 60_000);
    h.lock(0, "L", a);
    assert_eq!(
        h.acquire(0, "L", b, 1_000),
        Response::LockQueued { position: 1 }
    );
    h.tick(2_000);
    assert!(!h.sm.leases.contains_key(&a));
    assert_eq!(h.holder("L"), None, "b's wait ended before a's lease did");
    assert!(h.sm.leases[&b].locks.is_empty());
}

#[test]
fn waiter_is_removed_when_its_lease_ends() {
    let mut h = H::new();
    let a = h.grant(0, 60_000);
    let b = h.grant(0, 2_000);
    let c = h.grant(0, 60_000);
    h.lock(0, "L", a);
    h.acquire(0, "L", b, 30_000);
    h.acquire(0, "L", c, 30_000);
    h.tick(2_000);
    assert_eq!(h.queue("L"), vec![c]);
    h.apply(2_001, Command::LeaseRevoke { lease_id: c });
    assert!(h.queue("L").is_empty());
    assert_eq!(h.holder("L").map(|x| x.0), Some(a));
    assert!(h.sm.wait_expiry.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Idempotency, time, snapshots
// ---------------------------------------------------------------------------------------------

#[test]
fn same_request_id_applies_once_and_returns_the_first_response() {
    let mut h = H::new();
    let grant = Command::LeaseGrant {
        ttl_ms: 10_000,
        owner: None,
    };
    let first = h.apply_req(0, Some("req-1"), grant.clone());
    assert_eq!(
        first,
        Response::LeaseGranted {
            lease_id: 1,
            ttl_ms: 10_000
        }
    );
    let before = h.sm.clone();
    let again = h.apply_req(10, Some("req-1"), grant.clone());
    assert_eq!(again, first);
    assert_unchanged(&before, &h.sm);
    assert_eq!(h.sm.leases.keys().copied().collect::<Vec<_>>(), vec![1]);

    // A different key is a different request.
    let other = h.apply_req(20, Some("req-2"), grant);
    assert_eq!(
        other,
        Response::LeaseGranted {
            lease_id: 3,
            ttl_ms: 10_000
        }
    );
    assert_eq!(h.sm.leases.len(), 2);

    // A retried put returns its original version and revision.
    let first = h.apply_req(30, Some("put-1"), put("k", "v"));
    let again = h.apply_req(40, Some("put-1"), put("k", "v"));
    assert_eq!(first, again);
    assert_eq!(
        again,
        Response::KvPut {
            version: 1,
            revision: 4
        }
    );
    assert_eq!(h.sm.kv["k"].version, 1);
    assert_eq!(h.sm.kv["k"].mod_revision, 4);

    // Rejections are remembered too: a retry does not succeed on a changed state.
    let first = h.apply_req(50, Some("cas"), put_if("k", "x", Some(7), false));
    assert_eq!(code(&first), ErrorCode::PreconditionFailed);
    h.apply(60, put("k", "v2"));
    h.apply(60, put("k", "v3"));
    h.apply(60, put("k", "v4"));
    h.apply(60, put("k", "v5"));
    h.apply(60, put("k", "v6"));
    h.apply(60, put("k", "v7"));
    assert_eq!(h.sm.kv["k"].version, 7);
    let again = h.apply_req(70, Some("cas"), put_if("k", "x", Some(7), false));
    assert_eq!(again, first);
    assert_eq!(h.sm.kv["k"].value, "v7");
}

#[test]
fn request_ids_are_forgotten_after_the_retention_window() {
    let mut h = H::new();
    let t0 = 1_000;
    let first = h.apply_req(t0, Some("p"), put("k", "v"));
    assert_eq!(
        first,
        Response::KvPut {
            version: 1,
            revision: 1
        }
    );
    let r = h.apply_req(t0 + DEDUP_RETENTION_MS - 1, Some("p"), put("k", "v"));
    assert_eq!(r, first);
    assert_eq!(h.sm.kv["k"].version, 1);

    let r = h.apply_req(t0 + DEDUP_RETENTION_MS, Some("p"), put("k", "v"));
    assert_eq!(
        r,
        Response::KvPut {
            version: 2,
            revision: 3
        }
    );
    assert_eq!(h.sm.dedup["p"].time_ms, t0 + DEDUP_RETENTION_MS);
    assert_eq!(h.sm.dedup.len(), 1);
}

#[test]
fn at_most_dedup_max_ids_are_remembered_and_the_oldest_go_first() {
    let mut sm = Sm::new();
    let put_at = |sm: &mut Sm, index: u64, id: &str| {
        let entry = LogEntry {
            time_ms: 1_000 + index / 1_000,
            request_id: Some(id.to_string()),
            cmd: put("k", "v"),
        };
        sm.apply(index, 1, &entry)
    };
    let n = DEDUP_MAX_IDS as u64;
    for i in 1..=n {
        put_at(&mut sm, i, &format!("id-{i:07}"));
    }
    assert_eq!(sm.dedup.len(), DEDUP_MAX_IDS);
    // A retry of the oldest is still answered from the table (nothing applied).
    let first = put_at(&mut sm, n + 1, "id-0000001");
    assert_eq!(
        first,
        Response::KvPut {
            version: 1,
            revision: 1
        }
    );
    assert_eq!(sm.kv["k"].version, n);
    // One more new id: the oldest (by log time, then id) is forgotten, the rest stay.
    put_at(&mut sm, n + 2, "new");
    assert_eq!(sm.dedup.len(), DEDUP_MAX_IDS);
    assert!(!sm.dedup.contains_key("id-0000001"));
    assert!(sm.dedup.contains_key("id-0000002") && sm.dedup.contains_key("new"));
    // So a retry of it now applies again, as a new request.
    let again = put_at(&mut sm, n + 3, "id-0000001");
    assert_eq!(
        again,
        Response::KvPut {
            version: n + 2,
            revision: n + 3
        }
    );
    assert!(!sm.dedup.contains_key("id-0000002"));
    deep_check(&sm).unwrap();
}

#[test]
fn time_never_moves_backwards() {
    let mut h = H::new();
    h.tick(5_000);
    let lease = h.grant(1_000, 2_000);
    assert_eq!(h.sm.time_ms, 5_000);
    let l = &h.sm.leases[&lease];
    assert_eq!((l.granted_ms, l.deadline_ms), (5_000, 7_000));

    let other = h.grant(5_000, 60_000);
    h.lock(0, "L", other);
    assert_eq!(
        h.acquire(0, "L", lease, 1_000),
        Response::LockQueued { position: 1 }
    );
    assert_eq!(h.sm.locks["L"].queue[0].deadline_ms, 6_000);
    assert_eq!(h.sm.time_ms, 5_000);

    // A late entry stamped before the deadline does not resurrect or delay expiry.
    h.tick(7_000);
    assert!(!h.sm.leases.contains_key(&lease));
    h.tick(6_999);
    assert_eq!(h.sm.time_ms, 7_000);
    assert!(!h.sm.leases.contains_key(&lease));

    // Non-normal entries advance the index but not the clock.
    h.index += 1;
    h.sm.apply_other(h.index);
    assert_eq!((h.sm.index, h.sm.time_ms), (h.index, 7_000));
    let next = h.grant(7_000, 1_000);
    assert_eq!(next, h.index);
}

#[test]
fn snapshot_round_trip_is_equal_and_behaves_the_same() {
    let mut h = H::new();
    let a = h.grant(0, 5_000);
    let b = h.grant(0, 20_000);
    let c = h.grant(0, 20_000);
    h.lock(1, "L", a);
    h.acquire(2, "L", b, 10_000);
    h.acquire(3, "L", c, 1_000);
    h.apply(4, put_leased("k", "v", a));
    h.apply_req(5, Some("r"), put("j", "v"));

    let json = serde_json::to_string(&h.sm).expect("serialize");
    let restored: Sm = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(restored, h.sm);

    let mut copy = H {
        sm: restored,
        index: h.index,
        term: h.term,
    };
    // (time, term, request id, command)
    let steps: Vec<(u64, u64, Option<&str>, Command)> = vec![
        (6, 1, Some("r"), put("j", "v")),
        (1_003, 1, None, Command::Tick),
        (5_000, 1, None, Command::Tick),
        (5_001, 1, None, put_fenced("j", "w", "L", 0)),
        (19_500, 2, None, Command::Tick),
    ];
    for (t, term, req, cmd) in steps {
        h.term = term;
        copy.term = term;
        let r1 = h.apply_req(t, req, cmd.clone());
        let r2 = copy.apply_req(t, req, cmd);
        assert_eq!(r1, r2);
        assert_eq!(h.sm, copy.sm);
    }
    // The dedup hit, the waiter timeout, the hand-off and the grace all happened the same way.
    assert_eq!(h.sm.kv["j"].version, 1);
    assert_eq!(h.holder("L").map(|x| x.0), Some(b));
    assert!(!h.sm.kv.contains_key("k"));
    assert_eq!(h.sm.leases[&b].deadline_ms, 19_500 + LEADER_GRACE_MS);
    assert_eq!(h.sm.leases[&c].deadline_ms, 19_500 + LEADER_GRACE_MS);
}

#[test]
fn retire_node_is_recorded_once_and_changes_nothing_else() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    h.lock(0, "L", a);
    let before = h.sm.clone();
    assert_eq!(
        h.apply(1, Command::RetireNode { node_id: 3 }),
        Response::Done
    );
    assert_eq!(
        h.apply(2, Command::RetireNode { node_id: 3 }),
        Response::Done
    );
    assert_eq!(
        h.sm.retired_nodes.iter().copied().collect::<Vec<_>>(),
        vec![3]
    );
    let mut expected = before;
    expected.retired_nodes.insert(3);
    assert_unchanged(&expected, &h.sm);
}

#[test]
fn old_snapshots_and_entries_without_newer_fields_still_decode() {
    let mut h = H::new();
    let a = h.grant(0, 10_000);
    h.lock(0, "L", a);
    h.apply(1, put_leased("k", "v", a));
    let mut value = serde_json::to_value(&h.sm).expect("serialize");
    let object = value.as_object_mut().expect("Sm is a JSON object");
    for field in ["retired_nodes", "term"] {
        assert!(object.remove(field).is_some(), "{field} is serialized");
    }
    let mut old: Sm = serde_json::from_value(value).expect("old snapshot decodes");
    assert_eq!(old.term, 0);
    old.term = h.sm.term;
    assert_eq!(old, h.sm);

    let entry: LogEntry =
        serde_json::from_str(r#"{"time_ms":5,"cmd":"Tick"}"#).expect("old entry decodes");
    assert_eq!(
        entry,
        LogEntry {
            time_ms: 5,
            request_id: None,
            cmd: Command::Tick
        }
    );
    let rejected: Response =
        serde_json::from_str(r#"{"Rejected":{"code":"lock_held","message":"m"}}"#)
            .expect("old rejection decodes");
    assert_eq!(rejected, Response::reject(ErrorCode::LockHeld, "m"));
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

const LOCKS: [&str; 3] = ["a", "b", "c"];
const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
/// Slots below `LIVE_SLOTS` name a live lease (when there is one), the next one the most
/// recently granted lease (perhaps ended), the last one a lease that never existed.
const LIVE_SLOTS: usize = 4;
const LEASE_SLOTS: usize = LIVE_SLOTS + 2;
const MISSING_LEASE: u64 = 1_000_000;

#[derive(Debug, Clone)]
enum FenceTok {
    /// The lock's current token (or 1 if it has no holder).
    Current,
    /// That much below the current token.
    Stale(u64),
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Blank,
    Tick,
    /// A leader change: the term goes up, the new leader writes its blank entry, and its first
    /// normal entry (the next step's) comes `election_ms` later.
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
    Acquire {
        lock: usize,
        lease: usize,
        /// Pick among the live leases that neither hold nor wait for the lock, if any.
        contend: bool,
        wait_ms: u64,
    },
    Release {
        lock: usize,
        /// `None`: whoever holds the lock (or another lock, if this one is free).
        lease: Option<usize>,
    },
    Put {
        key: usize,
        lease: Option<usize>,
        if_version: Option<u64>,
        if_absent: bool,
        fence: Option<(usize, FenceTok)>,
    },
    Delete {
        key: usize,
        if_version: Option<u64>,
    },
    Retire {
        node_id: u64,
    },
}

#[derive(Debug, Clone)]
struct Step {
    dt: u64,
    /// Stamp the entry `dt` before the current time instead (a clock that went backwards).
    backwards: bool,
    request: Option<u8>,
    op: Op,
}

/// Mostly live leases; sometimes an ended or never-granted one.
fn lease_slot() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..LIVE_SLOTS, 1 => Just(LIVE_SLOTS), 1 => Just(LIVE_SLOTS + 1)]
}

/// Mostly the same lock, so that queues form.
fn lock_slot() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let ttl = prop_oneof![
        1 => Just(0u64),
        1 => Just(MIN_TTL_MS - 1),
        2 => Just(MIN_TTL_MS),
        4 => MIN_TTL_MS..6_000,
        8 => 6_000u64..40_000,
    ];
    let fence_tok = prop_oneof![
        3 => Just(FenceTok::Current),
        1 => (1u64..3).prop_map(FenceTok::Stale),
        1 => (0u64..100).prop_map(FenceTok::Raw),
    ];
    prop_oneof![
        1 => Just(Op::Blank),
        3 => Just(Op::Tick),
        2 => (0u64..6_000).prop_map(|election_ms| Op::Elect { election_ms }),
        6 => ttl.prop_map(|ttl_ms| Op::Grant { ttl_ms }),
        3 => lease_slot().prop_map(|lease| Op::KeepAlive { lease }),
        1 => lease_slot().prop_map(|lease| Op::Revoke { lease }),
        8 => (
            lock_slot(),
            lease_slot(),
            prop::bool::weighted(0.6),
            prop_oneof![2 => Just(0u64), 3 => 1u64..3_000, 2 => 3_000u64..15_000],
        )
            .prop_map(|(lock, lease, contend, wait_ms)| Op::Acquire {
                lock,
                lease,
                contend,
                wait_ms,
            }),
        3 => (lock_slot(), prop::option::weighted(0.3, lease_slot()))
            .prop_map(|(lock, lease)| Op::Release { lock, lease }),
        4 => (
            0..KEYS.len(),
            prop::option::weighted(0.4, lease_slot()),
            prop::option::weighted(0.3, 0u64..4),
            prop::bool::weighted(0.15),
            prop::option::weighted(0.3, (lock_slot(), fence_tok)),
        )
            .prop_map(|(key, lease, if_version, if_absent, fence)| Op::Put {
                key,
                lease,
                if_version,
                if_absent,
                fence,
            }),
        1 => (0..KEYS.len(), prop::option::weighted(0.3, 0u64..4))
            .prop_map(|(key, if_version)| Op::Delete { key, if_version }),
        1 => (1u64..4).prop_map(|node_id| Op::Retire { node_id }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            3 => Just(0u64),
            6 => 1u64..200,
            2 => 200u64..1_500,
            1 => 1_500u64..6_000,
        ],
        prop::bool::weighted(0.1),
        prop::option::weighted(0.2, 0u8..3),
        op_strategy(),
    )
        .prop_map(|(dt, backwards, request, op)| Step {
            dt,
            backwards,
            request,
            op,
        })
}

/// A few leases granted up front (so that locks are contended from the start), then up to 60
/// steps in all.
fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    let grant = (MIN_TTL_MS..20_000).prop_map(|ttl_ms| Step {
        dt: 0,
        backwards: false,
        request: None,
        op: Op::Grant { ttl_ms },
    });
    (
        prop::collection::vec(grant, 0..=4),
        prop::collection::vec(step_strategy(), 0..=60),
    )
        .prop_map(|(mut steps, rest)| {
            steps.extend(rest);
            steps.truncate(60);
            steps
        })
}

pub(super) fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// A state machine driven by generated steps, with what the checks need to remember.
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
    /// Last seen (holder lease, token) of every lock that was ever held.
    holders: BTreeMap<String, (u64, u64)>,
}

impl Run {
    fn new() -> Run {
        Run {
            sm: Sm::new(),
            index: 0,
            term: 1,
            election_ms: 0,
            granted: Vec::new(),
            holders: BTreeMap::new(),
        }
    }

    fn lease(&self, slot: usize) -> u64 {
        let live = self.sm.leases.len();
        if slot < LIVE_SLOTS && live > 0 {
            return *self.sm.leases.keys().nth(slot % live).expect("in range");
        }
        match self.granted.last() {
            Some(id) if slot < LEASE_SLOTS - 1 => *id,
            _ => MISSING_LEASE,
        }
    }

    fn token(&self, lock: &str) -> Option<u64> {
        self.sm
            .locks
            .get(lock)
            .and_then(|l| l.holder.as_ref())
            .map(|h| h.token)
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
            Op::Acquire {
                lock,
                lease,
                contend,
                wait_ms,
            } => {
                let name = LOCKS[*lock];
                let involved = |id: &u64| {
                    let l = &self.sm.leases[id];
                    l.locks.contains(name) || l.waiting.contains(name)
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
                Command::LockAcquire {
                    name: name.into(),
                    lease_id,
                    wait_ms: *wait_ms,
                    mode: LockMode::Exclusive,
                }
            }
            Op::Release { lock, lease } => {
                let name = LOCKS[*lock];
                match lease {
                    Some(slot) => Command::LockRelease {
                        name: name.into(),
                        lease_id: self.lease(*slot),
                    },
                    // The holder of this lock, or else of the first held lock.
                    None => {
                        let held = self
                            .sm
                            .locks
                            .get_key_value(name)
                            .or(self.sm.locks.first_key_value());
                        match held {
                            Some((name, l)) => Command::LockRelease {
                                name: name.clone(),
                                lease_id: l.holder.as_ref().map_or(MISSING_LEASE, |h| h.lease_id),
                            },
                            None => Command::LockRelease {
                                name: name.into(),
                                lease_id: self.lease(0),
                            },
                        }
                    }
                }
            }
            Op::Put {
                key,
                lease,
                if_version,
                if_absent,
                fence,
            } => Command::KvPut {
                key: KEYS[*key].into(),
                value: format!("v{}", self.index + 1),
                lease_id: lease.map(|s| self.lease(s)),
                if_version: *if_version,
                if_absent: *if_absent,
                fence: fence.as_ref().map(|(lock, tok)| {
                    let current = self.token(LOCKS[*lock]);
                    let token = match tok {
                        FenceTok::Current => current.unwrap_or(1),
                        FenceTok::Stale(n) => current.unwrap_or(1).saturating_sub(*n),
                        FenceTok::Raw(t) => *t,
                    };
                    Fence {
                        lock: LOCKS[*lock].into(),
                        token,
                    }
                }),
            },
            Op::Delete { key, if_version } => Command::KvDelete {
                key: KEYS[*key].into(),
                if_version: *if_version,
            },
            Op::Retire { node_id } => Command::RetireNode { node_id: *node_id },
        };
        let base = self.sm.time_ms + self.election_ms;
        let time_ms = if step.backwards {
            base.saturating_sub(step.dt)
        } else {
            base + step.dt
        };
        Some(LogEntry {
            time_ms,
            request_id: step.request.map(|r| format!("req-{r}")),
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
            // Blank and membership entries (a new leader's first entry is blank) change nothing
            // but the index: not the clock, not the term.
            let before = self.sm.clone();
            self.sm.apply_other(index);
            prop_assert_eq!(self.sm.index, index);
            let mut expected = before;
            expected.index = index;
            prop_assert_eq!(&self.sm, &expected);
            return Ok(None);
        };
        self.election_ms = 0;
        let term = self.term;
        let pre = self.sm.clone();
        let now = entry.time_ms.max(pre.time_ms);
        let dup = entry
            .request_id
            .as_ref()
            .and_then(|id| pre.dedup.get(id))
            .filter(|d| d.time_ms + DEDUP_RETENTION_MS > now)
            .map(|d| d.response.clone());

        let resp = self.sm.apply(index, term, &entry);

        deep_check(&self.sm).map_err(|e| fail(format!("after {entry:?} at {index}: {e}")))?;
        prop_assert_eq!(self.sm.index, index);
        prop_assert_eq!(self.sm.time_ms, now);
        prop_assert_eq!(self.sm.term, term);

        // `twin` is the pre-state after only the grace (if this entry opens a term) and the
        // expiry of this entry: a `Tick` at the same time in the same term. It is the state any
        // rejected or duplicate command must leave behind.
        let mut twin = pre.clone();
        let twin_resp = twin.apply(
            index,
            term,
            &LogEntry {
                time_ms: entry.time_ms,
                request_id: entry.request_id.clone(),
                cmd: Command::Tick,
            },
        );
        deep_check(&twin).map_err(|e| fail(format!("twin of {entry:?} at {index}: {e}")))?;
        check_grace_and_expiry(&pre, &twin, now, term)?;
        if let Some(first) = dup {
            prop_assert_eq!(&resp, &first);
            prop_assert_eq!(&twin_resp, &first);
            prop_assert_eq!(&self.sm, &twin, "a duplicate request changed the state");
        } else {
            if let Some(id) = &entry.request_id {
                prop_assert_eq!(&self.sm.dedup[id.as_str()].response, &resp);
                twin.dedup.get_mut(id).expect("twin recorded it").response = resp.clone();
            }
            self.check_response(&entry.cmd, &resp, &pre, &twin, index, now)?;
        }
        self.check_holders(index)?;
        Ok(Some(resp))
    }

    /// The response agrees with the command and with the state it left (`pre`: the state before
    /// the entry; `twin`: `pre` after only this entry's expiry).
    fn check_response(
        &mut self,
        cmd: &Command,
        resp: &Response,
        pre: &Sm,
        twin: &Sm,
        index: u64,
        now: u64,
    ) -> Result<(), TestCaseError> {
        let sm = &self.sm;
        let expected = expected_rejection(cmd, twin);
        match (resp, &expected) {
            // A refused wait is checked against the graph; nothing else to compare.
            (Response::Rejected(rej), None) if rej.code == ErrorCode::Deadlock => {
                let victim = match cmd {
                    Command::LockAcquire { lease_id, .. } => *lease_id,
                    _ => return Err(fail(format!("{cmd:?} refused as a deadlock"))),
                };
                return super::harness::check_deadlock_refusal(twin, sm, victim, rej).map_err(fail);
            }
            (Response::Rejected(rej), Some(want)) => {
                prop_assert_eq!(rej.code, want.code);
                prop_assert_eq!(rej.current_version, want.current_version);
                prop_assert_eq!(rej.current_token, want.current_token);
            }
            (Response::Rejected(rej), None) => {
                return Err(fail(format!("{cmd:?} should apply, got {rej:?}")));
            }
            (_, Some(want)) => {
                return Err(fail(format!(
                    "{cmd:?} should be rejected with {want:?}, got {resp:?}"
                )));
            }
            (_, None) => {}
        }
        match (cmd, resp) {
            (_, Response::Rejected(_)) => {
                prop_assert_eq!(sm, twin, "a rejected command changed the state");
            }
            (Command::Tick, Response::Done) => prop_assert_eq!(sm, twin),
            (Command::RetireNode { node_id }, Response::Done) => {
                let mut expected = twin.clone();
                expected.retired_nodes.insert(*node_id);
                prop_assert_eq!(sm, &expected);
            }
            (
                Command::LeaseGrant { ttl_ms, .. },
                Response::LeaseGranted {
                    lease_id,
                    ttl_ms: t,
                },
            ) => {
                prop_assert_eq!(*lease_id, index);
                prop_assert!(!pre.leases.contains_key(lease_id), "lease id reused");
                prop_assert_eq!(t, ttl_ms);
                prop_assert_eq!(sm.leases[lease_id].deadline_ms, now + ttl_ms);
                self.granted.push(*lease_id);
            }
            (
                Command::LeaseKeepAlive { lease_id },
                Response::LeaseKept {
                    lease_id: l,
                    ttl_ms,
                },
            ) => {
                prop_assert_eq!(l, lease_id);
                let before = twin.leases[lease_id].deadline_ms;
                prop_assert_eq!(sm.leases[lease_id].deadline_ms, before.max(now + ttl_ms));
            }
            (Command::LeaseRevoke { lease_id }, Response::LeaseRevoked { lease_id: l }) => {
                prop_assert_eq!(l, lease_id);
                prop_assert!(twin.leases.contains_key(lease_id));
                prop_assert!(!sm.leases.contains_key(lease_id));
            }
            (
                Command::KvPut {
                    key,
                    value,
                    lease_id,
                    ..
                },
                Response::KvPut { version, revision },
            ) => {
                prop_assert_eq!(*revision, index);
                let e = &sm.kv[key];
                prop_assert_eq!(e.version, *version);
                prop_assert_eq!(e.version, twin.kv.get(key).map_or(0, |e| e.version) + 1);
                prop_assert_eq!(e.mod_revision, index);
                prop_assert_eq!(&e.value, value);
                prop_assert_eq!(e.lease_id, *lease_id);
            }
            (Command::KvDelete { key, .. }, Response::KvDeleted { deleted, revision }) => {
                prop_assert_eq!(*revision, index);
                prop_assert_eq!(*deleted, twin.kv.contains_key(key));
                prop_assert!(!sm.kv.contains_key(key));
            }
            (Command::LockAcquire { name, lease_id, .. }, Response::LockGranted { token }) => {
                prop_assert!(sm.leases.contains_key(lease_id), "granted to a dead lease");
                let h = sm.locks[name]
                    .holder
                    .as_ref()
                    .expect("granted lock has a holder");
                prop_assert_eq!((h.lease_id, h.token), (*lease_id, *token));
            }
            (Command::LockAcquire { name, lease_id, .. }, Response::LockQueued { position }) => {
                let queue = &sm.locks[name].queue;
                prop_assert!(*position >= 1);
                prop_assert_eq!(queue[*position as usize - 1].lease_id, *lease_id);
            }
            (Command::LockRelease { name, lease_id }, Response::LockReleased { next_holder }) => {
                prop_assert_eq!(
                    twin.locks[name].holder.as_ref().map(|h| h.lease_id),
                    Some(*lease_id)
                );
                prop_assert!(!sm.leases[lease_id].locks.contains(name));
                match next_holder {
                    Some(next) => {
                        prop_assert!(sm.leases.contains_key(next), "handed to a dead lease");
                        let h = sm.locks[name].holder.as_ref().expect("handed-off holder");
                        prop_assert_eq!((h.lease_id, h.token), (*next, index));
                        prop_assert_eq!(
                            twin.locks[name].queue.iter().map(|w| w.lease_id).next(),
                            Some(*next),
                            "hand-off is not FIFO"
                        );
                    }
                    None => {
                        prop_assert!(!sm.locks.contains_key(name));
                        prop_assert!(twin.locks[name].queue.is_empty());
                    }
                }
            }
            (cmd, resp) => {
                return Err(fail(format!("response {resp:?} does not fit {cmd:?}")));
            }
        }
        Ok(())
    }

    /// Every change of holder is a grant at this index, to a live lease, with a token above
    /// every earlier token of that lock.
    fn check_holders(&mut self, index: u64) -> Result<(), TestCaseError> {
        for (name, lock) in &self.sm.locks {
            let h = lock.holder.as_ref().expect("every kept lock has a holder");
            prop_assert!(
                self.sm.leases.contains_key(&h.lease_id),
                "lock {} held by dead lease {}",
                name,
                h.lease_id
            );
            match self.holders.get(name) {
                Some(&(lease, token)) if token == h.token => {
                    prop_assert_eq!(lease, h.lease_id, "same token, different holder");
                }
                Some(&(_, token)) => {
                    prop_assert!(h.token > token, "token of {} went back", name);
                    prop_assert_eq!(h.token, index);
                }
                None => prop_assert_eq!(h.token, index),
            }
            self.holders.insert(name.clone(), (h.lease_id, h.token));
        }
        Ok(())
    }
}

/// An independent model of what the grace and the expiry at the start of an entry do to the
/// leases and waits of `pre` (`twin`: `pre` after a `Tick` at `now` in `term`). If the entry opens
/// a term, every lease first gets at least `LEADER_GRACE_MS` left (so none ends); then every
/// lease at or past its deadline ends. Waits are never extended.
fn check_grace_and_expiry(pre: &Sm, twin: &Sm, now: u64, term: u64) -> Result<(), TestCaseError> {
    let new_term = term > pre.term;
    prop_assert_eq!(twin.term, term);
    let mut expected = BTreeMap::new();
    for (id, l) in &pre.leases {
        let deadline = match new_term {
            true => l.deadline_ms.max(now.saturating_add(LEADER_GRACE_MS)),
            false => l.deadline_ms,
        };
        if deadline > now {
            expected.insert(*id, deadline);
        }
    }
    let got: BTreeMap<u64, u64> = twin
        .leases
        .iter()
        .map(|(id, l)| (*id, l.deadline_ms))
        .collect();
    prop_assert_eq!(got, expected, "new term: {}", new_term);
    for (name, lock) in &twin.locks {
        for w in &lock.queue {
            prop_assert!(
                pre.locks.get(name).is_some_and(|k| k.queue.contains(w)),
                "waiter {:?} on {} is new or changed",
                w,
                name
            );
        }
    }
    // Expiry runs in deadline order: a lock whose holder's lease ended goes (if to anyone) to a
    // waiter that was still waiting when it ended.
    for (name, lock) in &pre.locks {
        let Some(old) = &lock.holder else { continue };
        if twin.leases.contains_key(&old.lease_id) {
            continue;
        }
        let ended = pre.leases[&old.lease_id].deadline_ms;
        if let Some(new) = twin.locks.get(name).and_then(|k| k.holder.as_ref()) {
            let waiter = lock.queue.iter().find(|w| w.lease_id == new.lease_id);
            prop_assert!(
                waiter.is_some_and(|w| w.deadline_ms > ended),
                "{} went to {:?}, not waiting when lease {} ended at {}",
                name,
                waiter,
                old.lease_id,
                ended
            );
        }
    }
    Ok(())
}

/// An independent model of which commands a state rejects, and how.
fn expected_rejection(cmd: &Command, sm: &Sm) -> Option<Rejection> {
    let reject = |code| Some(Rejection::new(code, ""));
    let holder = |name: &str| sm.locks.get(name).and_then(|l| l.holder.clone());
    let version_check = |key: &str, want: Option<u64>| {
        let current = sm.kv.get(key).map_or(0, |e| e.version);
        match want {
            Some(v) if v != current => Some(Rejection {
                current_version: Some(current),
                ..Rejection::new(ErrorCode::PreconditionFailed, "")
            }),
            _ => None,
        }
    };
    match cmd {
        Command::Tick | Command::RetireNode { .. } => None,
        Command::LeaseGrant { ttl_ms, .. } if !(MIN_TTL_MS..=MAX_TTL_MS).contains(ttl_ms) => {
            reject(ErrorCode::InvalidArgument)
        }
        Command::LeaseGrant { .. } => None,
        Command::LeaseKeepAlive { lease_id } | Command::LeaseRevoke { lease_id }
            if !sm.leases.contains_key(lease_id) =>
        {
            reject(ErrorCode::LeaseNotFound)
        }
        Command::LeaseKeepAlive { .. } | Command::LeaseRevoke { .. } => None,
        Command::KvPut {
            key,
            lease_id,
            if_version,
            if_absent,
            fence,
            ..
        } => {
            if key.is_empty() {
                return reject(ErrorCode::InvalidArgument);
            }
            if lease_id.is_some_and(|id| !sm.leases.contains_key(&id)) {
                return reject(ErrorCode::LeaseNotFound);
            }
            if let Some(f) = fence {
                let current = holder(&f.lock).map(|h| h.token);
                if current != Some(f.token) {
                    return Some(Rejection {
                        current_token: current,
                        ..Rejection::new(ErrorCode::Fenced, "")
                    });
                }
            }
            version_check(key, if *if_absent { Some(0) } else { *if_version })
        }
        Command::KvDelete { key, if_version } => version_check(key, *if_version),
        Command::LockAcquire {
            name,
            lease_id,
            wait_ms,
            ..
        } => {
            if name.is_empty() || *wait_ms > MAX_WAIT_MS {
                return reject(ErrorCode::InvalidArgument);
            }
            if !sm.leases.contains_key(lease_id) {
                return reject(ErrorCode::LeaseNotFound);
            }
            match holder(name) {
                Some(h)
                    if h.lease_id != *lease_id
                        && *wait_ms == 0
                        && !sm.leases[lease_id].waiting.contains(name) =>
                {
                    Some(Rejection {
                        current_token: Some(h.token),
                        ..Rejection::new(ErrorCode::LockHeld, "")
                    })
                }
                _ => None,
            }
        }
        Command::LockRelease { name, lease_id } => {
            if !sm.leases.contains_key(lease_id) {
                return reject(ErrorCode::LeaseNotFound);
            }
            match holder(name) {
                Some(h) if h.lease_id == *lease_id => None,
                _ => reject(ErrorCode::Conflict),
            }
        }
        // Semaphores, conditions and the other primitives have their own tests
        // (`semaphore_tests.rs`, `condition_tests.rs`, ...); these sequences never issue them.
        _ => None,
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_sequences_keep_the_invariants(steps in steps_strategy()) {
        let (run, _) = run_all(&steps)?;
        run.sm.check_invariants().map_err(fail)?;
    }

    #[test]
    fn snapshot_round_trip_is_equal_and_continues_identically(
        steps in steps_strategy(),
        split in any::<prop::sample::Index>(),
    ) {
        let split = split.index(steps.len() + 1);
        let (mut run, _) = run_all(&steps[..split])?;
        let json = serde_json::to_string(&run.sm).map_err(fail)?;
        let restored: Sm = serde_json::from_str(&json).map_err(fail)?;
        prop_assert_eq!(&restored, &run.sm);
        let mut copy = Run { sm: restored, ..run.clone() };
        for s in &steps[split..] {
            prop_assert_eq!(run.entry(s), copy.entry(s));
            let r1 = run.step(s)?;
            let r2 = copy.step(s)?;
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(&run.sm, &copy.sm);
        }
    }

    #[test]
    fn replay_is_deterministic(steps in steps_strategy()) {
        let (first, r1) = run_all(&steps)?;
        let (second, r2) = run_all(&steps)?;
        prop_assert_eq!(r1, r2);
        prop_assert_eq!(&first.sm, &second.sm);
        prop_assert_eq!(
            serde_json::to_string(&first.sm).map_err(fail)?,
            serde_json::to_string(&second.sm).map_err(fail)?
        );
    }
}

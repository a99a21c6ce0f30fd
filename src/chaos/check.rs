//! Checkers for chaos-run histories: register linearizability, lock safety, semaphore capacity,
//! barrier releases.
//!
//! Purpose: decide, from a paired history alone (`crate::chaos::history`), whether the cluster
//! broke a promise. Every checker is pure, deterministic (keys are visited in `BTreeMap` order)
//! and conservative: it flags only what the history proves. Each finding is a [`Violation`] whose
//! `checker` names the rule (the `*` constants below). One name is not a bug report:
//! [`REGISTER_INCONCLUSIVE`] means the search gave up (see [`Violation::is_inconclusive`]).
//!
//! # Registers ([`check_register`])
//! A read/write/cas register per key, initially absent (`None`). Fail ops did not happen and are
//! dropped; Info ops (and invokes never completed) may take effect at any time after their invoke,
//! or never, so their return time is +infinity and they may be left out; Info reads say nothing
//! and are dropped. A Cas takes effect iff the current value equals `expected`.
//!
//! Algorithm: Wing & Gong's depth-first search as refined by Lowe and Porcupine, run per key.
//! A search node is (set of linearized ops as a bitset, register state). The ops that may be
//! linearized next are those invoked no later than the earliest return among the completed ops
//! not yet linearized (at equal times calls come first, so touching intervals count as
//! concurrent: the permissive reading). The search applies one such op whose model step succeeds,
//! and backtracks when none is left; it succeeds when every op that completed Ok is linearized
//! (the remaining ones are Info and may be left out). Porcupine's memo of visited (bitset, state)
//! pairs makes it polynomial in the width of the history for a fixed value domain.
//!
//! Info ops are what make this search blow up (each one may take effect anywhere later, forever),
//! so they get their own treatment, each step sound by an exchange argument on linearizations:
//! - before the search, an Info write/cas is dropped if no op whose return is not earlier than its
//!   invoke requires its new value (reads it, or expects it in a cas): in a linearization the op
//!   after it could then only be a write, and removing it changes nothing (repeated to a
//!   fixpoint);
//! - identical Info ops (same op and values) form a class and are used in invoke order (the
//!   earlier one can stand wherever the later one can), so a node records a count per class
//!   instead of a set;
//! - an Info op is applied only if it changes the state to a value some op that may go next
//!   requires, and then the very next op must require it (the node is flagged so in the memo);
//! - a memo entry that was fully explored without success also prunes every node with the same
//!   bitset, state and flag that has used at least as many Info ops of each class (fewer options);
//! - a fast path rejects at once an Ok read or cas that needs a value nothing ever wrote.
//!
//! The search has a step budget ([`REGISTER_STEP_BUDGET`] moves tried); when it runs out the key
//! is reported as [`REGISTER_INCONCLUSIVE`], never as a violation (2M moves take ~1 s in a
//! release build). Measured in a release build, one key, a few percent Info ops: linearizable
//! histories of 500 ops with ~12 in flight take 1-4 ms; proving a stale read at the very end
//! (the worst case: everything before it must be exhausted) of 500 ops with distinct written
//! values takes ~20 ms with ~12 in flight and ~0.6 s with ~20 in flight; with a 5-value domain
//! the same proof stays under ~0.2 s up to ~200 ops but can exceed the budget beyond ~300. So a
//! runner should write distinct values (e.g. from process id and sequence number) and move to a
//! fresh key every few hundred ops.
//!
//! On failure the report is shrunk to the shortest failing prefix: the prefix at time `T` holds
//! the ops invoked by `T`, those that had not completed by `T` becoming Info. Linearizability is
//! prefix-closed, so failure is monotone in `T` and a binary search over Ok completion times
//! finds the first completion after which no linearization exists; the violation lists the ops of
//! that prefix (with their real outcomes) and names the op whose completion made it impossible.
//! The probes share a budget of four searches; if it runs out, the violation lists every op of
//! the key instead.
//!
//! # Locks ([`check_locks`], per lock name)
//! Tokens are Raft log indexes of grants, strictly increasing cluster-wide. Checked:
//! - [`LOCK_DUPLICATE_TOKEN`]: two Ok acquires by different processes got the same token;
//! - [`LOCK_TOKEN_ORDER`]: an Ok acquire B invoked after an Ok acquire A of another process
//!   completed got a token not greater than A's (real-time order); for the same process a token
//!   never goes down (a re-acquire may return the same token);
//! - [`LOCK_FENCED_ORDER`]: Ok fenced writes sorted by revision have non-decreasing tokens (no
//!   stale holder's write was accepted after a newer holder's);
//! - [`LOCK_REVISION_ORDER`]: an Ok fenced write invoked after another completed has a larger
//!   revision (otherwise the revisions the previous rule relies on are wrong);
//! - [`LOCK_UNKNOWN_TOKEN`]: an Ok fenced write used a token no Ok acquire returned; skipped when
//!   the lock has an Info acquire, which may have granted any token.
//! - [`LOCK_STALE_TOKEN`]: an Ok fenced write with token `t` was accepted at revision `r` although
//!   an Ok acquire was granted token `t2` with `t < t2 < r`: at `r` the lock belonged to `t2` or a
//!   later grant, so `t` was stale and the fence had to refuse it (tokens and revisions are both
//!   log indexes, so this needs no clock);
//! - [`LOCK_LEASE_HOLD`]: a hold ended before its lease could have expired. An Ok acquire with
//!   `valid_until_ns` (the lease grant's invoke plus its TTL) holds the lock until then unless
//!   a release carrying its token was invoked first. Flagged: another Ok acquire with a larger
//!   token completed inside that window, or a fenced write with the hold's token failed with
//!   `fenced` inside it (the cluster dropped the hold early: a lease expired too soon, or a
//!   grant went to someone else). Windows shrink by [`CLOCK_MARGIN_NS`], because the cluster
//!   stamps times in whole milliseconds.
//!
//! # Semaphores ([`check_semaphores`], per name)
//! A process definitely holds a permit from the completion of its Ok acquire until the invoke of
//! its next release (of any outcome) or, if earlier, the invoke of the op that retired it (Info):
//! a retired client stops renewing its lease, so the cluster may legitimately expire its permit.
//! Holds of one process are merged (a re-acquire may be idempotent). At equal times ends come
//! before starts. If at some instant more than `capacity` processes hold a permit, that is a
//! [`SEMAPHORE_CAPACITY`] violation, reported once per over-capacity episode.
//! A live client can also lose its permit by lease expiry (a long partition, a slow grant): a
//! hold therefore also ends at the acquire's `valid_until_ns`, the time until which the lease
//! is guaranteed alive (its grant's invoke plus the TTL; the cluster stamps the deadline later
//! than that). A client acting past it holds nothing; fencing, not the permit, protects that.
//!
//! # Barriers ([`check_barriers`], per name)
//! An Ok wait of generation `g` (in `value`, with the release token in `token` and the parties
//! in `capacity`) proves two things about its lease: it arrived in `g` by a log entry created
//! after the wait's invoke and no later than the releasing entry (the arrival itself, or a
//! resume of a wait the lease had open in `g`), and its answer came after the releasing entry
//! was committed. That holds whatever the Info ops did (an unknown arrival can only add parties
//! the history does not show), provided the client never names a `generation` nor reuses a
//! `request_id` across operations: a plain wait after a release is an arrival in a later
//! generation. So every rule below speaks of Ok waits only, and each one is definite; all of them
//! are [`BARRIER_RELEASE`] violations, with the message naming the rule:
//! - a generation has at most `parties` Ok waits, and they all name the same `parties` (an
//!   arrival naming another count is refused while anyone waits); generations start at 1;
//! - all Ok waits of a generation carry the same token (the releasing entry's index), and tokens
//!   strictly increase with the generation;
//! - all-or-nothing in real time: within a generation, no Ok wait completed before another Ok
//!   wait of the same generation was invoked (nobody was released before the last of them
//!   arrived). For a generation with all `parties` Ok waits this is exactly "every party was
//!   invoked before any was released"; with fewer, the missing parties are unknown (Info, or
//!   not recorded) and nothing is said about them. Touching times count as concurrent;
//! - generations increase in real time: an Ok wait invoked after another Ok wait completed has a
//!   greater generation (in particular, one process's Ok waits have strictly increasing
//!   generations). An older generation is reported here; the same generation is the
//!   all-or-nothing rule's finding.
//!
//! Malformed input the checkers cannot judge (an Ok acquire without token, an Ok fenced write
//! without token or revision, a semaphore with no capacity, an Ok barrier wait without
//! generation, token or parties) is reported as [`HISTORY_MALFORMED`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chaos::history::{History, Kind, OpKind, Operation};

/// Default search budget per key (loop steps of the linearizability search).
pub const REGISTER_STEP_BUDGET: u64 = 2_000_000;

pub const REGISTER: &str = "register";
/// The search ran out of budget: outcome unknown, not a bug report.
pub const REGISTER_INCONCLUSIVE: &str = "register-inconclusive";
pub const LOCK_DUPLICATE_TOKEN: &str = "lock-duplicate-token";
pub const LOCK_TOKEN_ORDER: &str = "lock-token-order";
pub const LOCK_FENCED_ORDER: &str = "lock-fenced-order";
pub const LOCK_REVISION_ORDER: &str = "lock-revision-order";
pub const LOCK_UNKNOWN_TOKEN: &str = "lock-unknown-token";
pub const LOCK_STALE_TOKEN: &str = "lock-stale-token";
pub const LOCK_LEASE_HOLD: &str = "lock-lease-hold";
pub const SEMAPHORE_CAPACITY: &str = "semaphore-capacity";
pub const BARRIER_RELEASE: &str = "barrier-release";
pub const HISTORY_MALFORMED: &str = "history-malformed";

/// One finding of one checker, with the ops that prove it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Violation {
    /// Which rule: one of the `*` name constants of this module.
    pub checker: String,
    pub message: String,
    pub ops: Vec<Operation>,
}

impl Violation {
    fn new(checker: &str, message: String, ops: Vec<Operation>) -> Self {
        Violation {
            checker: checker.to_string(),
            message,
            ops,
        }
    }

    /// True for "the checker could not decide" findings, which are not evidence of a bug.
    pub fn is_inconclusive(&self) -> bool {
        self.checker == REGISTER_INCONCLUSIVE
    }
}

/// Pairs the history and runs every checker. `Err` only for a malformed history (see
/// `History::pair`).
pub fn check_all(h: &History) -> Result<Vec<Violation>, String> {
    let ops = h.pair()?;
    let mut out = check_register(&ops);
    out.extend(check_locks(&ops));
    out.extend(check_semaphores(&ops));
    out.extend(check_barriers(&ops));
    Ok(out)
}

fn describe(o: &Operation) -> String {
    let what = match o.op {
        OpKind::Read => format!("read -> {:?}", o.result_value),
        OpKind::Write => format!("write {:?}", o.value),
        OpKind::Cas => format!("cas {:?} -> {:?}", o.expected, o.value),
        OpKind::Acquire => format!("acquire (token {:?})", o.token),
        OpKind::Release => "release".to_string(),
        OpKind::FencedWrite => format!(
            "fenced write (token {:?}, revision {:?})",
            o.token, o.revision
        ),
        OpKind::SemAcquire => "sem acquire".to_string(),
        OpKind::SemRelease => "sem release".to_string(),
        OpKind::BarrierWait => format!(
            "barrier wait (parties {:?}, generation {:?}, token {:?})",
            o.capacity, o.value, o.token
        ),
    };
    let done = match o.complete_ns {
        Some(c) => format!("{c}"),
        None => "?".to_string(),
    };
    format!(
        "p{} {} {:?} [{}, {}] ns",
        o.process, what, o.outcome, o.invoke_ns, done
    )
}

// ---------------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------------

/// Linearizability of a read/write/cas register per key, with [`REGISTER_STEP_BUDGET`].
pub fn check_register(ops: &[Operation]) -> Vec<Violation> {
    check_register_with_budget(ops, REGISTER_STEP_BUDGET)
}

/// [`check_register`] with an explicit per-search step budget.
pub fn check_register_with_budget(ops: &[Operation], max_steps: u64) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops {
        let relevant = match o.op {
            OpKind::Read => o.outcome == Kind::Ok,
            OpKind::Write | OpKind::Cas => o.outcome != Kind::Fail,
            _ => false,
        };
        if relevant {
            by_key.entry(o.key.as_str()).or_default().push(o);
        }
    }
    let mut out = Vec::new();
    for (key, kops) in by_key {
        let mut budget = max_steps;
        match search(&search_ops(&kops, None), &mut budget) {
            Verdict::Linearizable => {}
            Verdict::Inconclusive => out.push(Violation::new(
                REGISTER_INCONCLUSIVE,
                format!(
                    "key {key:?}: linearizability search over {} ops gave up after {max_steps} \
                     steps; outcome unknown (not evidence of a bug)",
                    kops.len()
                ),
                kops.iter().map(|o| (*o).clone()).collect(),
            )),
            Verdict::NotLinearizable => out.push(shrink(key, &kops, max_steps)),
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RegOp {
    Read(Option<i64>),
    Write(Option<i64>),
    Cas {
        expected: Option<i64>,
        new: Option<i64>,
    },
}

impl RegOp {
    /// The model: the state after the op, or `None` if the op cannot happen in `state`.
    fn step(self, state: Option<i64>) -> Option<Option<i64>> {
        match self {
            RegOp::Read(v) => (v == state).then_some(state),
            RegOp::Write(v) => Some(v),
            RegOp::Cas { expected, new } => (expected == state).then_some(new),
        }
    }

    /// The state this op needs to find, if any.
    fn requires(self) -> Option<Option<i64>> {
        match self {
            RegOp::Read(v) => Some(v),
            RegOp::Write(_) => None,
            RegOp::Cas { expected, .. } => Some(expected),
        }
    }

    /// The state this op leaves, if it sets one.
    fn writes(self) -> Option<Option<i64>> {
        match self {
            RegOp::Read(_) => None,
            RegOp::Write(v) => Some(v),
            RegOp::Cas { new, .. } => Some(new),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct SearchOp {
    call: u64,
    /// `None`: Info, returns at +infinity and may be left out.
    ret: Option<u64>,
    op: RegOp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    Inconclusive,
}

/// The ops of one key as seen at time `cut` (`None` = the whole history): ops invoked after the
/// cut are dropped, ops not completed Ok by the cut become Info (Info reads are dropped), and
/// Info writes nobody can observe are pruned.
fn search_ops(kops: &[&Operation], cut: Option<u64>) -> Vec<SearchOp> {
    let mut v = Vec::with_capacity(kops.len());
    for o in kops {
        if cut.is_some_and(|t| o.invoke_ns > t) {
            continue;
        }
        let ret = match (o.outcome, o.complete_ns) {
            (Kind::Ok, Some(c)) if cut.is_none_or(|t| c <= t) => Some(c.max(o.invoke_ns)),
            _ => None,
        };
        let op = match o.op {
            OpKind::Read if ret.is_some() => RegOp::Read(o.result_value),
            OpKind::Read => continue,
            OpKind::Write => RegOp::Write(o.value),
            OpKind::Cas => RegOp::Cas {
                expected: o.expected,
                new: o.value,
            },
            _ => continue,
        };
        v.push(SearchOp {
            call: o.invoke_ns,
            ret,
            op,
        });
    }
    // Drop Info writes no later op can observe, until nothing changes.
    loop {
        // For each required value, the latest return among the ops requiring it (MAX = never).
        let mut required_until: HashMap<Option<i64>, u64> = HashMap::new();
        for s in &v {
            if let Some(req) = s.op.requires() {
                let until = required_until.entry(req).or_insert(0);
                *until = (*until).max(s.ret.unwrap_or(u64::MAX));
            }
        }
        let before = v.len();
        v.retain(|s| {
            s.ret.is_some()
                || s.op
                    .writes()
                    .and_then(|w| required_until.get(&w))
                    .is_some_and(|&until| until >= s.call)
        });
        if v.len() == before {
            return v;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Move {
    /// Linearize the finite op at this position (in call order).
    Finite(usize),
    /// Linearize the next unused Info op of this class.
    Info(usize),
}

/// One node of the depth-first search: the move that led here, and the moves left to try.
struct Frame {
    via: Option<(Move, Option<i64>)>,
    key: MemoKey,
    slot: usize,
    call_pos: usize,
    ret_pos: usize,
    moves: Vec<Move>,
    next: usize,
}

/// (linearized finite ops, state, "the next op must read the state": just after an Info op).
type MemoKey = (Box<[u64]>, Option<i64>, bool);

/// What the memo holds per key: the Info usage vectors seen, and whether each was fully explored
/// without success.
type Memo = HashMap<MemoKey, Vec<(Box<[u32]>, bool)>>;

/// Wing-Gong/Lowe search with Porcupine-style memoization, Info ops grouped into classes. See the
/// module docs.
fn search(ops: &[SearchOp], budget: &mut u64) -> Verdict {
    // Fast path: a completed op needing a value nothing ever wrote cannot be linearized.
    let written: HashSet<Option<i64>> = std::iter::once(None)
        .chain(ops.iter().filter_map(|s| s.op.writes()))
        .collect();
    if ops
        .iter()
        .any(|s| s.ret.is_some() && s.op.requires().is_some_and(|r| !written.contains(&r)))
    {
        return Verdict::NotLinearizable;
    }

    // Finite ops by call time; `ret_order` lists them by return time.
    let mut finite: Vec<(u64, u64, RegOp)> = ops
        .iter()
        .filter_map(|s| s.ret.map(|r| (s.call, r, s.op)))
        .collect();
    finite.sort_by_key(|&(c, r, _)| (c, r));
    let m = finite.len();
    if m == 0 {
        return Verdict::Linearizable;
    }
    let mut ret_order: Vec<usize> = (0..m).collect();
    ret_order.sort_by_key(|&p| (finite[p].1, p));

    // Info ops: identical ones form a class, used in invoke order.
    let mut class_ix: HashMap<RegOp, usize> = HashMap::new();
    let mut classes: Vec<(RegOp, Vec<u64>)> = Vec::new();
    for s in ops.iter().filter(|s| s.ret.is_none()) {
        let c = *class_ix.entry(s.op).or_insert_with(|| {
            classes.push((s.op, Vec::new()));
            classes.len() - 1
        });
        classes[c].1.push(s.call);
    }
    for (_, calls) in classes.iter_mut() {
        calls.sort_unstable();
    }

    let mut lin = vec![0u64; m.div_ceil(64)];
    let mut used = vec![0u32; classes.len()];
    let mut state: Option<i64> = None;
    let mut memo: Memo = HashMap::new();
    let is_set = |lin: &[u64], p: usize| lin[p / 64] & (1 << (p % 64)) != 0;

    // Builds the frame for the current node, or None when every finite op is linearized.
    let frame = |lin: &[u64],
                 used: &[u32],
                 via: Option<(Move, Option<i64>)>,
                 key: MemoKey,
                 slot: usize,
                 mut call_pos: usize,
                 mut ret_pos: usize|
     -> Option<Frame> {
        let (state, after_info) = (key.1, key.2);
        while call_pos < m && is_set(lin, call_pos) {
            call_pos += 1;
        }
        while ret_pos < m && is_set(lin, ret_order[ret_pos]) {
            ret_pos += 1;
        }
        if ret_pos == m {
            return None;
        }
        // Anything invoked by the earliest pending return may go next (ties: concurrent).
        let frontier = finite[ret_order[ret_pos]].1;
        let mut moves = Vec::new();
        // Values some op that may go next needs to find.
        let mut needed: Vec<Option<i64>> = Vec::new();
        for (p, &(call, _, op)) in finite.iter().enumerate().skip(call_pos) {
            if call > frontier {
                break;
            }
            if !is_set(lin, p) {
                let req = op.requires();
                if let Some(r) = req {
                    needed.push(r);
                }
                // Just after an Info op only an op reading its value may follow.
                if !after_info || req == Some(state) {
                    moves.push(Move::Finite(p));
                }
            }
        }
        let available = |c: usize| {
            classes[c]
                .1
                .get(used[c] as usize)
                .is_some_and(|&t| t <= frontier)
        };
        for (c, (op, _)) in classes.iter().enumerate() {
            if let (Some(r), true) = (op.requires(), available(c)) {
                needed.push(r);
            }
        }
        for (c, (op, _)) in classes.iter().enumerate() {
            // An Info op is worth applying only if it changes the state to a value the next op
            // needs (otherwise it can be dropped from any linearization).
            let useful = op
                .writes()
                .is_some_and(|w| w != state && needed.contains(&w));
            let allowed = !after_info || op.requires() == Some(state);
            if useful && allowed && available(c) {
                moves.push(Move::Info(c));
            }
        }
        Some(Frame {
            via,
            key,
            slot,
            call_pos,
            ret_pos,
            moves,
            next: 0,
        })
    };

    let root_key: MemoKey = (lin.clone().into_boxed_slice(), state, false);
    memo.insert(
        root_key.clone(),
        vec![(used.clone().into_boxed_slice(), false)],
    );
    let Some(root) = frame(&lin, &used, None, root_key, 0, 0, 0) else {
        return Verdict::Linearizable;
    };
    let mut stack = vec![root];
    while let Some(top) = stack.last_mut() {
        if top.next == top.moves.len() {
            // Explored without success: remember, so weaker nodes are pruned, and backtrack.
            if let Some(list) = memo.get_mut(&top.key) {
                list[top.slot].1 = true;
            }
            if let Some((mv, old_state)) = top.via {
                match mv {
                    Move::Finite(p) => lin[p / 64] &= !(1 << (p % 64)),
                    Move::Info(c) => used[c] -= 1,
                }
                state = old_state;
            }
            stack.pop();
            continue;
        }
        let mv = top.moves[top.next];
        top.next += 1;
        if *budget == 0 {
            return Verdict::Inconclusive;
        }
        *budget -= 1;
        let op = match mv {
            Move::Finite(p) => finite[p].2,
            Move::Info(c) => classes[c].0,
        };
        let Some(new_state) = op.step(state) else {
            continue;
        };
        match mv {
            Move::Finite(p) => lin[p / 64] |= 1 << (p % 64),
            Move::Info(c) => used[c] += 1,
        }
        let key: MemoKey = (
            lin.clone().into_boxed_slice(),
            new_state,
            matches!(mv, Move::Info(_)),
        );
        let list = memo.entry(key.clone()).or_default();
        // Seen already, or weaker than a node that failed (it has no more Info ops left).
        let pruned = list.iter().any(|(u, failed)| {
            **u == *used || (*failed && u.iter().zip(used.iter()).all(|(a, b)| a <= b))
        });
        if pruned {
            match mv {
                Move::Finite(p) => lin[p / 64] &= !(1 << (p % 64)),
                Move::Info(c) => used[c] -= 1,
            }
            continue;
        }
        list.push((used.clone().into_boxed_slice(), false));
        let slot = list.len() - 1;
        let (call_pos, ret_pos) = (top.call_pos, top.ret_pos);
        match frame(&lin, &used, Some((mv, state)), key, slot, call_pos, ret_pos) {
            None => return Verdict::Linearizable,
            Some(f) => {
                state = new_state;
                stack.push(f);
            }
        }
    }
    Verdict::NotLinearizable
}

/// Builds the violation for a non-linearizable key, shrunk to the shortest failing prefix.
fn shrink(key: &str, kops: &[&Operation], max_steps: u64) -> Violation {
    let mut times: Vec<u64> = kops
        .iter()
        .filter(|o| o.outcome == Kind::Ok)
        .filter_map(|o| o.complete_ns)
        .collect();
    times.sort_unstable();
    times.dedup();
    let all = || kops.iter().map(|o| (*o).clone()).collect::<Vec<_>>();
    let whole = Violation::new(
        REGISTER,
        format!(
            "key {key:?}: no linearization of its {} ops exists (initial value absent)",
            kops.len()
        ),
        all(),
    );
    if times.is_empty() {
        return whole;
    }
    // Invariant: the prefix at times[hi] fails (the last Ok completion's prefix differs from the
    // whole history only by Info ops invoked later, which can only help).
    // The probes share a budget of a few whole searches; when it runs out, report everything.
    let mut budget = max_steps.saturating_mul(4);
    let (mut lo, mut hi) = (0, times.len() - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match search(&search_ops(kops, Some(times[mid])), &mut budget) {
            Verdict::NotLinearizable => hi = mid,
            Verdict::Linearizable => lo = mid + 1,
            Verdict::Inconclusive => return whole,
        }
    }
    let t = times[lo];
    let window: Vec<Operation> = kops
        .iter()
        .filter(|o| o.invoke_ns <= t)
        .map(|o| (*o).clone())
        .collect();
    let culprits: Vec<String> = kops
        .iter()
        .filter(|o| o.outcome == Kind::Ok && o.complete_ns == Some(t))
        .map(|o| describe(o))
        .collect();
    Violation::new(
        REGISTER,
        format!(
            "key {key:?}: not linearizable (initial value absent); the {} ops invoked by t={t} ns \
             have no linearization once {} completed (ops not complete by then counted as \
             unknown; first {} of {} ops of the key)",
            window.len(),
            culprits.join(" and "),
            window.len(),
            kops.len()
        ),
        window,
    )
}

// ---------------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------------

/// Lock safety per lock name: token uniqueness and real-time order, fenced writes in token order,
/// fenced writes only with granted tokens. See the module docs.
pub fn check_locks(ops: &[Operation]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops {
        if matches!(
            o.op,
            OpKind::Acquire | OpKind::Release | OpKind::FencedWrite
        ) {
            by_key.entry(o.key.as_str()).or_default().push(o);
        }
    }
    let mut out = Vec::new();
    for (key, kops) in by_key {
        check_lock(key, &kops, &mut out);
    }
    out
}

/// Tracks, over a growing set of (token, process) pairs, the maximum token and the maximum token
/// among processes other than the maximum's, so "max token of a process other than q" is O(1).
#[derive(Default)]
struct Top2<'a> {
    first: Option<(u64, &'a Operation)>,
    second: Option<(u64, &'a Operation)>,
}

impl<'a> Top2<'a> {
    fn add(&mut self, t: u64, o: &'a Operation) {
        match self.first {
            None => self.first = Some((t, o)),
            Some((ft, fo)) if fo.process == o.process => {
                if t > ft {
                    self.first = Some((t, o));
                }
            }
            Some((ft, fo)) => {
                if t > ft {
                    self.second = Some((ft, fo));
                    self.first = Some((t, o));
                } else if self.second.is_none_or(|(st, _)| t > st) {
                    self.second = Some((t, o));
                }
            }
        }
    }

    fn max_other_than(&self, process: u64) -> Option<(u64, &'a Operation)> {
        match self.first {
            Some((_, fo)) if fo.process == process => self.second,
            f => f,
        }
    }
}

fn check_lock(key: &str, kops: &[&Operation], out: &mut Vec<Violation>) {
    let mut acquires: Vec<(u64, &Operation)> = Vec::new();
    let mut unknown_grant = false;
    for &o in kops.iter().filter(|o| o.op == OpKind::Acquire) {
        match (o.outcome, o.token) {
            (Kind::Ok, Some(t)) => acquires.push((t, o)),
            (Kind::Ok, None) => {
                unknown_grant = true;
                out.push(Violation::new(
                    HISTORY_MALFORMED,
                    format!("lock {key:?}: ok acquire without a token: {}", describe(o)),
                    vec![o.clone()],
                ));
            }
            (Kind::Info, _) | (Kind::Invoke, _) => unknown_grant = true,
            (Kind::Fail, _) => {}
        }
    }

    // (a) One token, one holder.
    let mut by_token: BTreeMap<u64, Vec<&Operation>> = BTreeMap::new();
    for &(t, o) in &acquires {
        by_token.entry(t).or_default().push(o);
    }
    for (t, group) in &by_token {
        let processes: BTreeSet<u64> = group.iter().map(|o| o.process).collect();
        if processes.len() > 1 {
            out.push(Violation::new(
                LOCK_DUPLICATE_TOKEN,
                format!("lock {key:?}: token {t} was granted to processes {processes:?}"),
                group.iter().map(|o| (*o).clone()).collect(),
            ));
        }
    }

    // (b) Real-time order: an acquire invoked after another completed gets a larger token.
    let mut by_complete: Vec<(u64, u64, &Operation)> = acquires
        .iter()
        .filter_map(|&(t, o)| o.complete_ns.map(|c| (c, t, o)))
        .collect();
    by_complete.sort_by_key(|&(c, t, o)| (c, t, o.process));
    let mut by_invoke: Vec<(u64, &Operation)> = acquires.clone();
    by_invoke.sort_by_key(|&(t, o)| (o.invoke_ns, t, o.process));
    let mut top = Top2::default();
    let mut k = 0;
    let mut per_process: HashMap<u64, (u64, &Operation)> = HashMap::new();
    for &(t, b) in &by_invoke {
        while k < by_complete.len() && by_complete[k].0 < b.invoke_ns {
            top.add(by_complete[k].1, by_complete[k].2);
            k += 1;
        }
        if let Some((at, a)) = top.max_other_than(b.process) {
            if at >= t {
                out.push(Violation::new(
                    LOCK_TOKEN_ORDER,
                    format!(
                        "lock {key:?}: {} got token {t}, not above token {at} of {}, which \
                         completed before it was invoked",
                        describe(b),
                        describe(a)
                    ),
                    vec![a.clone(), b.clone()],
                ));
            }
        }
        // Ops of one process are sequential, so invoke order is real-time order here.
        match per_process.get(&b.process) {
            Some(&(pt, a)) if t < pt => out.push(Violation::new(
                LOCK_TOKEN_ORDER,
                format!(
                    "lock {key:?}: process {} got token {t} after earlier token {pt}: {} then {}",
                    b.process,
                    describe(a),
                    describe(b)
                ),
                vec![a.clone(), b.clone()],
            )),
            Some(&(pt, _)) if t == pt => {}
            _ => {
                per_process.insert(b.process, (t, b));
            }
        }
    }

    // Ok fenced writes.
    let mut writes: Vec<(u64, u64, &Operation)> = Vec::new();
    for &o in kops
        .iter()
        .filter(|o| o.op == OpKind::FencedWrite && o.outcome == Kind::Ok)
    {
        match (o.token, o.revision) {
            (Some(t), Some(r)) => writes.push((r, t, o)),
            _ => out.push(Violation::new(
                HISTORY_MALFORMED,
                format!(
                    "lock {key:?}: ok fenced write without token or revision: {}",
                    describe(o)
                ),
                vec![o.clone()],
            )),
        }
    }

    // (c) Accepted in token order: by revision, tokens never decrease.
    writes.sort_by_key(|&(r, t, o)| (r, t, o.invoke_ns));
    let mut max_tok: Option<(u64, &Operation)> = None;
    for &(r, t, w) in &writes {
        match max_tok {
            Some((mt, m)) if t < mt => out.push(Violation::new(
                LOCK_FENCED_ORDER,
                format!(
                    "lock {key:?}: fenced write with token {t} accepted at revision {r}, after a \
                     write with the larger token {mt} at revision {:?}: {} after {}",
                    m.revision,
                    describe(w),
                    describe(m)
                ),
                vec![m.clone(), w.clone()],
            )),
            Some((mt, _)) if t == mt => {}
            _ => max_tok = Some((t, w)),
        }
    }

    // Revisions respect real time, so the order above is the cluster's order.
    let mut w_complete: Vec<(u64, u64, &Operation)> = writes
        .iter()
        .filter_map(|&(r, _, o)| o.complete_ns.map(|c| (c, r, o)))
        .collect();
    w_complete.sort_by_key(|&(c, r, _)| (c, r));
    let mut w_invoke: Vec<(u64, &Operation)> = writes.iter().map(|&(r, _, o)| (r, o)).collect();
    w_invoke.sort_by_key(|&(r, o)| (o.invoke_ns, r));
    let mut k = 0;
    let mut max_rev: Option<(u64, &Operation)> = None;
    for &(r, w) in &w_invoke {
        while k < w_complete.len() && w_complete[k].0 < w.invoke_ns {
            let (_, pr, po) = w_complete[k];
            if max_rev.is_none_or(|(mr, _)| pr > mr) {
                max_rev = Some((pr, po));
            }
            k += 1;
        }
        if let Some((mr, m)) = max_rev {
            if r <= mr {
                out.push(Violation::new(
                    LOCK_REVISION_ORDER,
                    format!(
                        "lock {key:?}: {} answered revision {r}, not above revision {mr} of {}, \
                         which completed before it was invoked",
                        describe(w),
                        describe(m)
                    ),
                    vec![m.clone(), w.clone()],
                ));
            }
        }
    }

    // (d) Only granted tokens write.
    if !unknown_grant {
        for &(_, t, w) in &writes {
            if !by_token.contains_key(&t) {
                out.push(Violation::new(
                    LOCK_UNKNOWN_TOKEN,
                    format!(
                        "lock {key:?}: write with a token no acquire granted: {}",
                        describe(w)
                    ),
                    vec![w.clone()],
                ));
            }
        }
    }

    // (e) A stale token is refused once a later grant exists.
    let granted: BTreeSet<u64> = acquires.iter().map(|&(t, _)| t).collect();
    for &(r, t, w) in &writes {
        if let Some(&t2) = granted.range(t + 1..r).next() {
            let a = by_token[&t2][0];
            out.push(Violation::new(
                LOCK_STALE_TOKEN,
                format!(
                    "lock {key:?}: {} was accepted at revision {r} although token {t2} was \
                     granted at index {t2} before it: {}",
                    describe(w),
                    describe(a)
                ),
                vec![a.clone(), w.clone()],
            ));
        }
    }

    check_lease_holds(key, kops, &acquires, out);
}

/// Slack for clock comparisons between the history (nanoseconds) and the cluster's lease
/// deadlines (stamped in whole milliseconds by the leader).
pub const CLOCK_MARGIN_NS: u64 = 5_000_000;

/// (f) [`LOCK_LEASE_HOLD`]: holds end no earlier than their release or their lease's guaranteed life.
fn check_lease_holds(
    key: &str,
    kops: &[&Operation],
    acquires: &[(u64, &Operation)],
    out: &mut Vec<Violation>,
) {
    // First release invoke per token.
    let mut released: HashMap<u64, u64> = HashMap::new();
    for o in kops.iter().filter(|o| o.op == OpKind::Release) {
        if let Some(t) = o.token {
            let e = released.entry(t).or_insert(o.invoke_ns);
            *e = (*e).min(o.invoke_ns);
        }
    }
    // Guaranteed windows: (token, window end, acquire).
    let mut holds: Vec<(u64, u64, &Operation)> = Vec::new();
    for &(t, a) in acquires {
        let (Some(v), Some(_)) = (a.valid_until_ns, a.complete_ns) else {
            continue;
        };
        let end = released
            .get(&t)
            .map_or(v, |&r| r.min(v))
            .saturating_sub(CLOCK_MARGIN_NS);
        holds.push((t, end, a));
    }
    if holds.is_empty() {
        return;
    }
    // Earliest completion among acquires with a token above each token: a suffix minimum over
    // acquires sorted by token.
    let mut sorted: Vec<(u64, u64, &Operation)> = acquires
        .iter()
        .filter_map(|&(t, o)| o.complete_ns.map(|c| (t, c, o)))
        .collect();
    sorted.sort_by_key(|&(t, c, _)| (t, c));
    let mut suffix: Vec<Option<(u64, &Operation)>> = vec![None; sorted.len() + 1];
    for i in (0..sorted.len()).rev() {
        let (_, c, o) = sorted[i];
        suffix[i] = match suffix[i + 1] {
            Some((c2, o2)) if c2 <= c => Some((c2, o2)),
            _ => Some((c, o)),
        };
    }
    for &(t, end, a) in &holds {
        let first_above = sorted.partition_point(|&(t2, _, _)| t2 <= t);
        if let Some((c, b)) = suffix[first_above] {
            if c < end {
                out.push(Violation::new(
                    LOCK_LEASE_HOLD,
                    format!(
                        "lock {key:?}: {} was granted while {} still held the lock (its lease \
                         was alive until at least {} ns and it had not released)",
                        describe(b),
                        describe(a),
                        a.valid_until_ns.unwrap_or(0)
                    ),
                    vec![a.clone(), b.clone()],
                ));
            }
        }
    }
    let window: HashMap<u64, (u64, &Operation)> =
        holds.iter().map(|&(t, end, a)| (t, (end, a))).collect();
    for w in kops.iter().filter(|o| {
        o.op == OpKind::FencedWrite
            && o.outcome == Kind::Fail
            && o.error.as_deref() == Some("fenced")
    }) {
        let (Some(t), Some(c)) = (w.token, w.complete_ns) else {
            continue;
        };
        if let Some(&(end, a)) = window.get(&t) {
            if c < end {
                out.push(Violation::new(
                    LOCK_LEASE_HOLD,
                    format!(
                        "lock {key:?}: {} was refused as fenced while {} still held the lock (its \
                         lease was alive until at least {} ns and it had not released)",
                        describe(w),
                        describe(a),
                        a.valid_until_ns.unwrap_or(0)
                    ),
                    vec![a.clone(), (*w).clone()],
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Semaphores
// ---------------------------------------------------------------------------------------------

/// Semaphore capacity per name: never more than `capacity` definite holders at once. See the
/// module docs for what "definite" means.
pub fn check_semaphores(ops: &[Operation]) -> Vec<Violation> {
    // A process is retired by its (only) Info op; from its invoke on, it may have stopped.
    let mut retired_at: HashMap<u64, u64> = HashMap::new();
    for o in ops.iter().filter(|o| o.outcome == Kind::Info) {
        let e = retired_at.entry(o.process).or_insert(o.invoke_ns);
        *e = (*e).min(o.invoke_ns);
    }
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops {
        if matches!(o.op, OpKind::SemAcquire | OpKind::SemRelease) {
            by_key.entry(o.key.as_str()).or_default().push(o);
        }
    }
    let mut out = Vec::new();
    for (key, kops) in by_key {
        check_semaphore(key, &kops, &retired_at, &mut out);
    }
    out
}

fn check_semaphore(
    key: &str,
    kops: &[&Operation],
    retired_at: &HashMap<u64, u64>,
    out: &mut Vec<Violation>,
) {
    let acquires: Vec<&Operation> = kops
        .iter()
        .copied()
        .filter(|o| o.op == OpKind::SemAcquire && o.outcome == Kind::Ok)
        .filter(|o| o.complete_ns.is_some())
        .collect();
    if acquires.is_empty() {
        return;
    }
    let Some(capacity) = acquires.iter().filter_map(|o| o.capacity).max() else {
        out.push(Violation::new(
            HISTORY_MALFORMED,
            format!("semaphore {key:?}: no acquire records the capacity"),
            acquires.iter().map(|o| (*o).clone()).collect(),
        ));
        return;
    };
    let mut releases: HashMap<u64, Vec<u64>> = HashMap::new();
    for o in kops.iter().filter(|o| o.op == OpKind::SemRelease) {
        releases.entry(o.process).or_default().push(o.invoke_ns);
    }
    for r in releases.values_mut() {
        r.sort_unstable();
    }
    // Hold intervals [start, end) per process; end u64::MAX = held to the end of the history.
    let mut holds: BTreeMap<u64, Vec<(u64, u64, &Operation)>> = BTreeMap::new();
    for &a in &acquires {
        let start = a.complete_ns.unwrap_or(a.invoke_ns);
        let release = releases
            .get(&a.process)
            .and_then(|r| r.iter().copied().find(|&t| t >= start));
        let retire = retired_at.get(&a.process).copied().filter(|&t| t >= start);
        let end = release
            .into_iter()
            .chain(retire)
            .chain(a.valid_until_ns)
            .min()
            .unwrap_or(u64::MAX);
        if end > start {
            holds.entry(a.process).or_default().push((start, end, a));
        }
    }
    // Merge each process's holds; sweep with ends before starts at equal times.
    let mut points: Vec<(u64, bool, u64, &Operation)> = Vec::new();
    for (&p, hs) in holds.iter_mut() {
        hs.sort_by_key(|&(s, e, _)| (s, e));
        let mut cur: Option<(u64, u64, &Operation)> = None;
        for &(s, e, a) in hs.iter() {
            cur = match cur {
                Some((cs, ce, ca)) if s <= ce => Some((cs, ce.max(e), ca)),
                Some((cs, ce, ca)) => {
                    points.push((cs, true, p, ca));
                    if ce != u64::MAX {
                        points.push((ce, false, p, ca));
                    }
                    Some((s, e, a))
                }
                None => Some((s, e, a)),
            };
        }
        if let Some((cs, ce, ca)) = cur {
            points.push((cs, true, p, ca));
            if ce != u64::MAX {
                points.push((ce, false, p, ca));
            }
        }
    }
    points.sort_by_key(|&(t, is_start, p, _)| (t, is_start, p));
    let mut active: BTreeMap<u64, &Operation> = BTreeMap::new();
    let mut over = false;
    for (t, is_start, p, a) in points {
        if is_start {
            active.insert(p, a);
            if active.len() as u64 > capacity && !over {
                over = true;
                let holders: Vec<u64> = active.keys().copied().collect();
                out.push(Violation::new(
                    SEMAPHORE_CAPACITY,
                    format!(
                        "semaphore {key:?} (capacity {capacity}): {} processes {holders:?} held \
                         a permit at t={t} ns (each had an ok acquire and had not yet invoked a \
                         release)",
                        holders.len()
                    ),
                    active.values().map(|o| (*o).clone()).collect(),
                ));
            }
        } else {
            active.remove(&p);
            if active.len() as u64 <= capacity {
                over = false;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------------------------

/// Barrier releases per name: all-or-nothing, one token per generation, generations and tokens
/// in order. See the module docs.
pub fn check_barriers(ops: &[Operation]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.op == OpKind::BarrierWait) {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    let mut out = Vec::new();
    for (key, kops) in by_key {
        check_barrier(key, &kops, &mut out);
    }
    out
}

/// An Ok barrier wait with every field the rules need.
#[derive(Clone, Copy)]
struct Pass<'a> {
    generation: u64,
    token: u64,
    parties: u64,
    invoke: u64,
    complete: u64,
    op: &'a Operation,
}

fn check_barrier(key: &str, kops: &[&Operation], out: &mut Vec<Violation>) {
    let mut passes: Vec<Pass> = Vec::new();
    for &o in kops.iter().filter(|o| o.outcome == Kind::Ok) {
        let (Some(g), Some(token), Some(parties), Some(complete)) =
            (o.value, o.token, o.capacity, o.complete_ns)
        else {
            out.push(Violation::new(
                HISTORY_MALFORMED,
                format!(
                    "barrier {key:?}: ok wait without generation, token or parties: {}",
                    describe(o)
                ),
                vec![o.clone()],
            ));
            continue;
        };
        if g < 1 {
            out.push(Violation::new(
                BARRIER_RELEASE,
                format!(
                    "barrier {key:?}: released generation {g}, but generations start at 1: {}",
                    describe(o)
                ),
                vec![o.clone()],
            ));
            continue;
        }
        passes.push(Pass {
            generation: g as u64,
            token,
            parties,
            invoke: o.invoke_ns,
            complete,
            op: o,
        });
    }
    let mut by_gen: BTreeMap<u64, Vec<Pass>> = BTreeMap::new();
    for p in &passes {
        by_gen.entry(p.generation).or_default().push(*p);
    }
    let ops_of = |ps: &[Pass]| -> Vec<Operation> { ps.iter().map(|p| p.op.clone()).collect() };

    // Per generation: parties, count, one token, all-or-nothing in real time.
    let mut prev_token: Option<(u64, Pass)> = None;
    for (&g, ps) in &by_gen {
        let counts: BTreeSet<u64> = ps.iter().map(|p| p.parties).collect();
        if counts.len() > 1 {
            out.push(Violation::new(
                BARRIER_RELEASE,
                format!(
                    "barrier {key:?} generation {g}: ok waits named different parties {counts:?} \
                     (one generation has one count)"
                ),
                ops_of(ps),
            ));
        }
        let parties = counts.iter().copied().max().unwrap_or(0);
        if ps.len() as u64 > parties {
            out.push(Violation::new(
                BARRIER_RELEASE,
                format!(
                    "barrier {key:?} generation {g}: {} ok waits, more than its {parties} parties",
                    ps.len()
                ),
                ops_of(ps),
            ));
        }
        let tokens: BTreeSet<u64> = ps.iter().map(|p| p.token).collect();
        if tokens.len() > 1 {
            out.push(Violation::new(
                BARRIER_RELEASE,
                format!(
                    "barrier {key:?} generation {g}: ok waits carry different tokens {tokens:?} \
                     (one release, one token)"
                ),
                ops_of(ps),
            ));
        }
        // The latest invoke against the earliest completion: every Ok wait of `g` arrived before
        // the release and was answered after it.
        let last_in = ps.iter().max_by_key(|p| (p.invoke, p.op.process)).copied();
        let first_out = ps
            .iter()
            .min_by_key(|p| (p.complete, p.op.process))
            .copied();
        if let (Some(a), Some(b)) = (last_in, first_out) {
            if b.complete < a.invoke && a.op.process == b.op.process {
                out.push(Violation::new(
                    BARRIER_RELEASE,
                    format!(
                        "barrier {key:?} generation {g}: process p{} passed it twice (answered at \
                         {} ns, then again for a wait invoked at {} ns)",
                        a.op.process, b.complete, a.invoke
                    ),
                    vec![b.op.clone(), a.op.clone()],
                ));
            } else if b.complete < a.invoke {
                let full = if ps.len() as u64 == parties {
                    format!("all {parties} parties are ok")
                } else {
                    format!("{} ok waits, {parties} parties", ps.len())
                };
                out.push(Violation::new(
                    BARRIER_RELEASE,
                    format!(
                        "barrier {key:?} generation {g} ({full}): p{} was released at {} ns, \
                         before p{} invoked its wait at {} ns (released before every party \
                         arrived)",
                        b.op.process, b.complete, a.op.process, a.invoke
                    ),
                    vec![b.op.clone(), a.op.clone()],
                ));
            }
        }
        // Tokens strictly increase with the generation (compare with the smallest token here).
        let low = ps.iter().min_by_key(|p| p.token).copied();
        if let (Some((pg, pp)), Some(low)) = (prev_token, low) {
            if low.token <= pp.token {
                out.push(Violation::new(
                    BARRIER_RELEASE,
                    format!(
                        "barrier {key:?}: generation {g} has token {} but the earlier generation \
                         {pg} has token {} (tokens must increase with the generation)",
                        low.token, pp.token
                    ),
                    vec![pp.op.clone(), low.op.clone()],
                ));
            }
        }
        if let Some(high) = ps.iter().max_by_key(|p| p.token) {
            prev_token = Some((g, *high));
        }
    }

    // Generations in real time: sweep the invokes, knowing the highest generation among the
    // waits completed strictly earlier.
    let mut by_complete: Vec<Pass> = passes.clone();
    by_complete.sort_by_key(|p| (p.complete, p.op.process));
    let mut by_invoke: Vec<Pass> = passes;
    by_invoke.sort_by_key(|p| (p.invoke, p.op.process));
    let mut done = by_complete.iter().peekable();
    let mut top: Option<Pass> = None;
    for y in &by_invoke {
        while let Some(x) = done.next_if(|x| x.complete < y.invoke) {
            if top.is_none_or(|t| x.generation > t.generation) {
                top = Some(*x);
            }
        }
        let Some(x) = top else { continue };
        // Equal generations are the all-or-nothing rule above, already reported.
        if y.generation < x.generation {
            let who = if x.op.process == y.op.process {
                format!("process p{}", y.op.process)
            } else {
                format!("p{} after p{}", y.op.process, x.op.process)
            };
            out.push(Violation::new(
                BARRIER_RELEASE,
                format!(
                    "barrier {key:?}: {who}: a wait invoked at {} ns passed generation {}, \
                     older than generation {} released to a wait completed at {} ns",
                    y.invoke, y.generation, x.generation, x.complete
                ),
                vec![x.op.clone(), y.op.clone()],
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::Event;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn base(p: u64, op: OpKind, key: &str, inv: u64, comp: u64) -> Operation {
        Operation {
            process: p,
            op,
            key: key.to_string(),
            value: None,
            expected: None,
            token: None,
            revision: None,
            capacity: None,
            valid_until_ns: None,
            outcome: Kind::Ok,
            invoke_ns: inv,
            complete_ns: Some(comp),
            result_value: None,
            error: None,
        }
    }
    fn w(p: u64, key: &str, v: i64, inv: u64, comp: u64) -> Operation {
        Operation {
            value: Some(v),
            ..base(p, OpKind::Write, key, inv, comp)
        }
    }
    fn r(p: u64, key: &str, got: Option<i64>, inv: u64, comp: u64) -> Operation {
        Operation {
            result_value: got,
            ..base(p, OpKind::Read, key, inv, comp)
        }
    }
    fn cas(p: u64, exp: Option<i64>, new: i64, inv: u64, comp: u64) -> Operation {
        Operation {
            expected: exp,
            value: Some(new),
            ..base(p, OpKind::Cas, "k", inv, comp)
        }
    }
    fn fail(o: Operation) -> Operation {
        Operation {
            outcome: Kind::Fail,
            ..o
        }
    }
    fn info(o: Operation) -> Operation {
        Operation {
            outcome: Kind::Info,
            complete_ns: None,
            ..o
        }
    }
    fn acq(p: u64, token: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            token: Some(token),
            ..base(p, OpKind::Acquire, "L", inv, comp)
        }
    }
    fn rel(p: u64, inv: u64, comp: u64) -> Operation {
        base(p, OpKind::Release, "L", inv, comp)
    }
    fn fw(p: u64, token: u64, rev: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            token: Some(token),
            revision: Some(rev),
            value: Some(1),
            ..base(p, OpKind::FencedWrite, "L", inv, comp)
        }
    }
    fn sacq(p: u64, cap: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            capacity: Some(cap),
            ..base(p, OpKind::SemAcquire, "S", inv, comp)
        }
    }
    fn srel(p: u64, inv: u64, comp: u64) -> Operation {
        base(p, OpKind::SemRelease, "S", inv, comp)
    }
    /// An Ok wait at barrier "B" of 3 parties that passed generation `g` with token `token`.
    fn bw(p: u64, g: i64, token: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            capacity: Some(3),
            value: Some(g),
            token: Some(token),
            ..base(p, OpKind::BarrierWait, "B", inv, comp)
        }
    }
    /// A wait without a known release (for `fail` and `info`).
    fn bw_open(p: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            capacity: Some(3),
            ..base(p, OpKind::BarrierWait, "B", inv, comp)
        }
    }
    fn names(v: &[Violation]) -> Vec<&str> {
        v.iter().map(|v| v.checker.as_str()).collect()
    }
    fn reg(ops: &[Operation]) -> Vec<String> {
        check_register(ops).into_iter().map(|v| v.checker).collect()
    }

    // ----- registers: linearizable -----

    #[test]
    fn register_sequential_passes() {
        let ops = vec![
            r(1, "k", None, 0, 5),
            w(1, "k", 1, 10, 20),
            r(2, "k", Some(1), 30, 40),
            w(2, "k", 2, 50, 60),
            r(1, "k", Some(2), 70, 80),
            cas(1, Some(2), 3, 90, 100),
            r(2, "k", Some(3), 110, 120),
        ];
        assert!(reg(&ops).is_empty());
        assert!(reg(&[]).is_empty());
    }

    #[test]
    fn register_concurrent_writes_either_order_passes() {
        for last in [1, 2] {
            let ops = vec![
                w(1, "k", 1, 0, 100),
                w(2, "k", 2, 0, 100),
                r(3, "k", Some(last), 110, 120),
            ];
            assert!(reg(&ops).is_empty(), "final read {last}");
        }
        // A read concurrent with a write may see the old or the new value.
        for got in [Some(1), Some(2)] {
            let ops = vec![
                w(1, "k", 1, 0, 10),
                w(1, "k", 2, 20, 50),
                r(2, "k", got, 30, 40),
            ];
            assert!(reg(&ops).is_empty(), "concurrent read {got:?}");
        }
        // Touching intervals count as concurrent: a read invoked exactly when the write of 2
        // completes may still see 1; one invoked a nanosecond later may not.
        let touching = vec![
            w(1, "k", 1, 0, 10),
            w(1, "k", 2, 20, 50),
            r(2, "k", Some(1), 50, 60),
        ];
        assert!(reg(&touching).is_empty());
        let after = vec![
            w(1, "k", 1, 0, 10),
            w(1, "k", 2, 20, 50),
            r(2, "k", Some(1), 51, 60),
        ];
        assert_eq!(reg(&after), vec![REGISTER]);
        // Two readers disagreeing about the order of concurrent writes in real time.
        let ops = vec![
            w(1, "k", 1, 0, 100),
            w(2, "k", 2, 0, 100),
            r(3, "k", Some(1), 10, 20),
            r(4, "k", Some(2), 30, 40),
            r(5, "k", Some(2), 50, 60),
        ];
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_cas_success_and_failure_passes() {
        let ops = vec![
            cas(1, None, 1, 0, 10), // cas on the absent key
            cas(2, Some(1), 2, 20, 30),
            fail(cas(3, Some(1), 3, 40, 50)), // precondition failed
            r(1, "k", Some(2), 60, 70),
        ];
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_info_write_that_took_effect_later_passes() {
        let ops = vec![
            w(1, "k", 1, 0, 10),
            info(w(2, "k", 2, 20, 0)),
            r(3, "k", Some(1), 30, 40),
            r(3, "k", Some(2), 50, 60),
            r(4, "k", Some(2), 1000, 1010),
        ];
        assert!(reg(&ops).is_empty());
        // Info cas too.
        let ops = vec![
            w(1, "k", 1, 0, 10),
            info(cas(2, Some(1), 5, 20, 0)),
            r(3, "k", Some(1), 30, 40),
            r(3, "k", Some(5), 50, 60),
        ];
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_info_write_that_never_took_effect_passes() {
        let ops = vec![
            w(1, "k", 1, 0, 10),
            info(w(2, "k", 2, 20, 0)),
            r(3, "k", Some(1), 30, 40),
            r(3, "k", Some(1), 100, 110),
        ];
        assert!(reg(&ops).is_empty());
        // Even when its value is read from another write, it may be left out.
        let ops = vec![
            info(w(2, "k", 2, 0, 0)),
            r(3, "k", None, 30, 40),
            w(1, "k", 2, 50, 60),
            r(3, "k", Some(2), 70, 80),
            w(1, "k", 3, 90, 95),
            r(3, "k", Some(3), 100, 110),
        ];
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_info_read_and_fail_ops_ignored() {
        let ops = vec![
            w(1, "k", 1, 0, 10),
            info(r(2, "k", Some(42), 20, 0)),
            fail(w(3, "k", 9, 20, 30)),
            r(4, "k", Some(1), 40, 50),
        ];
        assert!(reg(&ops).is_empty());
        // A failed write did not happen: reading its value is a violation.
        let ops = vec![
            w(1, "k", 1, 0, 10),
            fail(w(3, "k", 9, 20, 30)),
            r(4, "k", Some(9), 40, 50),
        ];
        assert_eq!(reg(&ops), vec![REGISTER]);
    }

    // ----- registers: not linearizable -----

    #[test]
    fn register_stale_read_fails() {
        // The classic stale read from an old leader: 2 was acknowledged, then 1 is read.
        let ops = vec![
            w(1, "k", 1, 0, 10),
            w(1, "k", 2, 20, 30),
            r(2, "k", Some(1), 40, 50),
            w(1, "k", 3, 60, 70),
            r(2, "k", Some(3), 80, 90),
        ];
        let v = check_register(&ops);
        assert_eq!(names(&v), vec![REGISTER]);
        // Shrunk to the prefix ending at the stale read's completion.
        assert_eq!(v[0].ops, ops[..3].to_vec());
        assert!(v[0].message.contains("read -> Some(1)"), "{}", v[0].message);
        assert!(v[0].message.contains("\"k\""), "{}", v[0].message);
    }

    #[test]
    fn register_read_of_never_written_value_fails() {
        let ops = vec![w(1, "k", 1, 0, 10), r(2, "k", Some(7), 20, 30)];
        assert_eq!(reg(&ops), vec![REGISTER]);
        // Even when the read is concurrent with everything.
        let ops = vec![w(1, "k", 1, 0, 100), r(2, "k", Some(7), 0, 100)];
        assert_eq!(reg(&ops), vec![REGISTER]);
    }

    #[test]
    fn register_lost_acknowledged_write_fails() {
        let ops = vec![w(1, "k", 1, 0, 10), r(2, "k", None, 20, 30)];
        assert_eq!(reg(&ops), vec![REGISTER]);
        let ops = vec![
            w(1, "k", 1, 0, 10),
            w(2, "k", 2, 20, 30),
            r(3, "k", Some(2), 40, 50),
            r(3, "k", Some(1), 60, 70),
        ];
        assert_eq!(reg(&ops), vec![REGISTER]);
    }

    #[test]
    fn register_cas_against_non_current_value_fails() {
        let ops = vec![
            w(1, "k", 1, 0, 10),
            w(1, "k", 2, 20, 30),
            cas(2, Some(1), 3, 40, 50),
        ];
        assert_eq!(reg(&ops), vec![REGISTER]);
    }

    #[test]
    fn register_two_concurrent_cas_from_same_value_fail() {
        let ops = vec![
            w(1, "k", 0, 0, 10),
            cas(2, Some(0), 1, 20, 50),
            cas(3, Some(0), 2, 25, 55),
        ];
        assert_eq!(reg(&ops), vec![REGISTER]);
        // One of them failing is fine.
        let mut ops = ops;
        ops[2] = fail(ops[2].clone());
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_partitions_by_key() {
        let ops = vec![
            w(1, "a", 1, 0, 10),
            w(2, "b", 2, 0, 10),
            r(1, "a", Some(1), 20, 30),
            r(2, "b", Some(1), 20, 30),
        ];
        let v = check_register(&ops);
        assert_eq!(names(&v), vec![REGISTER]);
        assert!(v[0].ops.iter().all(|o| o.key == "b"));
        assert!(v[0].message.contains("\"b\""));
        // Lock and semaphore ops are not register ops.
        let ops = vec![acq(1, 5, 0, 10), fw(1, 5, 6, 20, 30)];
        assert!(reg(&ops).is_empty());
    }

    #[test]
    fn register_budget_exhaustion_is_inconclusive() {
        let ops = vec![
            w(1, "k", 1, 0, 10),
            w(2, "k", 2, 0, 10),
            r(3, "k", Some(2), 20, 30),
        ];
        let v = check_register_with_budget(&ops, 2);
        assert_eq!(names(&v), vec![REGISTER_INCONCLUSIVE]);
        assert!(v[0].is_inconclusive());
        assert_eq!(v[0].ops.len(), 3);
        assert!(check_register_with_budget(&ops, 1000).is_empty());
    }

    // ----- randomized registers -----

    struct Plan {
        key: String,
        op: OpKind,
        value: Option<i64>,
        expected: Option<i64>,
        outcome: Kind,
        report_completion: bool,
        inv: u64,
        comp: u64,
    }

    /// A history built from a sequential execution: op i takes effect at its linearization point
    /// 1000 + 10 i, and its interval is jittered around that point, so intervals overlap freely
    /// while the history stays linearizable by construction. Some writes and cas are Info (took
    /// effect), some extra writes are Info or Fail and never took effect.
    fn random_history(
        rng: &mut StdRng,
        n: usize,
        keys: &[&str],
        jitter: u64,
        values: i64,
    ) -> History {
        let mut model: BTreeMap<&str, Option<i64>> = keys.iter().map(|k| (*k, None)).collect();
        let mut plans = Vec::new();
        for i in 0..n {
            let lin = 1000 + 10 * i as u64;
            let key = keys[rng.gen_range(0..keys.len())];
            let cur = model[key];
            let mut p = Plan {
                key: key.to_string(),
                op: OpKind::Read,
                value: None,
                expected: None,
                outcome: Kind::Ok,
                report_completion: true,
                inv: lin - rng.gen_range(0..=jitter),
                comp: lin + rng.gen_range(1..=jitter),
            };
            let roll = rng.gen_range(0..100);
            if roll < 40 {
                p.value = cur;
                if rng.gen_bool(0.05) {
                    p.outcome = Kind::Info;
                }
            } else if roll < 70 {
                p.op = OpKind::Write;
                p.value = Some(rng.gen_range(0..values));
                model.insert(key, p.value);
                if rng.gen_bool(0.04) {
                    p.outcome = Kind::Info;
                }
            } else if roll < 92 {
                p.op = OpKind::Cas;
                p.expected = if rng.gen_bool(0.6) {
                    cur
                } else if rng.gen_bool(0.2) {
                    None
                } else {
                    Some(rng.gen_range(0..values))
                };
                p.value = Some(rng.gen_range(0..values));
                if p.expected == cur {
                    model.insert(key, p.value);
                    if rng.gen_bool(0.04) {
                        p.outcome = Kind::Info;
                    }
                } else {
                    p.outcome = Kind::Fail;
                }
            } else {
                // A write that never took effect.
                p.op = OpKind::Write;
                p.value = Some(rng.gen_range(0..values));
                p.outcome = if rng.gen_bool(0.5) {
                    Kind::Info
                } else {
                    Kind::Fail
                };
            }
            if p.outcome == Kind::Info {
                p.report_completion = rng.gen_bool(0.5);
            }
            plans.push(p);
        }
        // Give each op a process free at its invoke; a process retires after an Info.
        plans.sort_by_key(|p| p.inv);
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut next_id = 0;
        let mut events: Vec<Event> = Vec::new();
        for p in &plans {
            let id = match free.iter().position(|&(_, at)| at < p.inv) {
                Some(ix) => free.swap_remove(ix).0,
                None => {
                    next_id += 1;
                    next_id
                }
            };
            if p.outcome != Kind::Info {
                free.push((id, p.comp));
            }
            let mut inv = Event::new(id, Kind::Invoke, p.op, p.key.clone(), p.inv);
            if p.op != OpKind::Read {
                inv.value = p.value;
            }
            inv.expected = p.expected;
            events.push(inv);
            if p.report_completion {
                let mut c = Event::new(id, p.outcome, p.op, p.key.clone(), p.comp);
                if p.op == OpKind::Read && p.outcome == Kind::Ok {
                    c.value = p.value;
                }
                if p.outcome == Kind::Fail {
                    c.error = Some("precondition_failed".into());
                }
                events.push(c);
            }
        }
        events.sort_by_key(|e| e.time_ns);
        History { events }
    }

    fn mutate_one_read(rng: &mut StdRng, h: &mut History) -> Option<String> {
        let reads: Vec<usize> = (0..h.events.len())
            .filter(|&i| h.events[i].op == OpKind::Read && h.events[i].kind == Kind::Ok)
            .collect();
        if reads.is_empty() {
            return None;
        }
        let i = reads[rng.gen_range(0..reads.len())];
        h.events[i].value = Some(999_999);
        Some(h.events[i].key.clone())
    }

    #[test]
    fn register_random_linearizable_histories_pass_and_mutations_fail() {
        let mut mutated = 0;
        for seed in 0..300 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = rng.gen_range(1..80);
            let mut h = random_history(&mut rng, n, &["a", "b"], 40, 5);
            let v = check_all(&h).unwrap();
            assert!(v.is_empty(), "seed {seed}: {v:#?}\n{}", h.to_jsonl());
            let Some(key) = mutate_one_read(&mut rng, &mut h) else {
                continue;
            };
            mutated += 1;
            let v = check_all(&h).unwrap();
            assert_eq!(names(&v), vec![REGISTER], "seed {seed}");
            assert!(v[0].ops.iter().all(|o| o.key == key), "seed {seed}");
            assert!(
                v[0].ops.iter().any(|o| o.result_value == Some(999_999)),
                "seed {seed}: the mutated read is in the window"
            );
        }
        assert!(mutated > 250);
    }

    /// Appends, after everything else was invoked, an ok write of -1 and then a read of an
    /// earlier ok-written value that no Info op could write again: a stale read at the very end,
    /// which forces the search to exhaust the whole history. Returns false if there is no
    /// such value.
    fn append_stale_read(ops: &mut Vec<Operation>) -> bool {
        let info_values: HashSet<Option<i64>> = ops
            .iter()
            .filter(|o| o.outcome == Kind::Info && o.op != OpKind::Read)
            .map(|o| o.value)
            .collect();
        let Some(stale) = ops
            .iter()
            .filter(|o| o.outcome == Kind::Ok && o.op == OpKind::Write)
            .map(|o| o.value)
            .find(|v| !info_values.contains(v))
        else {
            return false;
        };
        let t = ops.iter().filter_map(|o| o.complete_ns).max().unwrap_or(0)
            + ops.iter().map(|o| o.invoke_ns).max().unwrap_or(0);
        ops.push(w(1_000_000, "k", -1, t, t + 1));
        ops.push(r(1_000_001, "k", stale, t + 2, t + 3));
        true
    }

    #[test]
    fn register_random_stale_read_at_end_fails() {
        // (ops, jitter, value domain): small domains make Info writes ambiguous, so they stay
        // shorter; with unique-ish values a few hundred highly concurrent ops are cheap.
        for (n, jitter, values) in [(150, 40, 5), (500, 60, 1_000_000)] {
            let mut checked = 0;
            for seed in 0..10 {
                let mut rng = StdRng::seed_from_u64(2000 + seed);
                let h = random_history(&mut rng, n, &["k"], jitter, values);
                let mut ops = h.pair().unwrap();
                assert!(check_register(&ops).is_empty(), "seed {seed}");
                if !append_stale_read(&mut ops) {
                    continue;
                }
                checked += 1;
                let start = std::time::Instant::now();
                let v = check_register(&ops);
                eprintln!(
                    "{n} ops, jitter {jitter}, {values} values, seed {seed}: stale read found in {:?}",
                    start.elapsed()
                );
                assert_eq!(names(&v), vec![REGISTER], "n {n} seed {seed}");
                // The failure is at the last op, so the window reaches it.
                assert_eq!(v[0].ops.last(), ops.last());
            }
            assert!(
                checked >= 5,
                "{n} ops: only {checked} histories had a stale candidate"
            );
        }
    }

    #[test]
    fn register_few_hundred_concurrent_ops_per_key_pass_quickly() {
        for (seed, values) in [(0, 5), (1, 5), (2, 1_000_000), (3, 1_000_000)] {
            let mut rng = StdRng::seed_from_u64(1000 + seed);
            // Jitter 60 around points 10 apart: up to ~12 ops in flight, plus Info ops.
            let h = random_history(&mut rng, 500, &["k"], 60, values);
            let ops = h.pair().unwrap();
            let start = std::time::Instant::now();
            // A tenth of the default budget is plenty for linearizable histories.
            let v = check_register_with_budget(&ops, REGISTER_STEP_BUDGET / 10);
            eprintln!(
                "500 ops, seed {seed}: linearizable in {:?}",
                start.elapsed()
            );
            assert!(v.is_empty(), "seed {seed}: {:?}", names(&v));
        }
    }

    /// Linearizability by enumeration, for tiny single-key histories: some subset of the Info
    /// ops plus every Ok op, in some order that respects real time and the model.
    fn brute_force_linearizable(ops: &[Operation]) -> bool {
        let items: Vec<(u64, Option<u64>, RegOp)> = ops
            .iter()
            .filter_map(|o| {
                let ret = (o.outcome == Kind::Ok).then_some(o.complete_ns).flatten();
                let op = match (o.op, o.outcome) {
                    (_, Kind::Fail) => return None,
                    (OpKind::Read, Kind::Ok) => RegOp::Read(o.result_value),
                    (OpKind::Read, _) => return None,
                    (OpKind::Write, _) => RegOp::Write(o.value),
                    (OpKind::Cas, _) => RegOp::Cas {
                        expected: o.expected,
                        new: o.value,
                    },
                    _ => return None,
                };
                Some((o.invoke_ns, ret, op))
            })
            .collect();
        fn place(
            items: &[(u64, Option<u64>, RegOp)],
            left: &mut Vec<usize>,
            st: Option<i64>,
        ) -> bool {
            if left.iter().all(|&i| items[i].1.is_none()) {
                return true; // the rest are Info and may be left out
            }
            for k in 0..left.len() {
                let x = left[k];
                // x may go next only if no op still left returned before x was invoked.
                if left
                    .iter()
                    .any(|&y| items[y].1.is_some_and(|r| r < items[x].0))
                {
                    continue;
                }
                if let Some(ns) = items[x].2.step(st) {
                    left.remove(k);
                    let ok = place(items, left, ns);
                    left.insert(k, x);
                    if ok {
                        return true;
                    }
                }
            }
            // Dropping an Info op is the same as never placing it, which the base case allows.
            false
        }
        place(&items, &mut (0..items.len()).collect(), None)
    }

    #[test]
    fn register_search_agrees_with_brute_force() {
        let mut rng = StdRng::seed_from_u64(7);
        let value = |rng: &mut StdRng| match rng.gen_range(0..4) {
            0 => None,
            v => Some(v),
        };
        let (mut lin, mut non) = (0, 0);
        for case in 0..3000 {
            let n = rng.gen_range(1..=7);
            let mut ops = Vec::new();
            for p in 0..n {
                let inv = rng.gen_range(0..20);
                let comp = inv + rng.gen_range(0..10);
                let mut o = match rng.gen_range(0..3) {
                    0 => r(p, "k", value(&mut rng), inv, comp),
                    1 => Operation {
                        value: value(&mut rng),
                        ..base(p, OpKind::Write, "k", inv, comp)
                    },
                    _ => Operation {
                        value: value(&mut rng),
                        ..cas(p, value(&mut rng), 0, inv, comp)
                    },
                };
                match rng.gen_range(0..10) {
                    0 => o = fail(o),
                    1 | 2 => o = info(o),
                    _ => {}
                }
                ops.push(o);
            }
            let expected = brute_force_linearizable(&ops);
            let v = check_register(&ops);
            assert_eq!(v.is_empty(), expected, "case {case}: {ops:#?} {v:#?}");
            if expected {
                lin += 1;
            } else {
                non += 1;
                // The reported window fails on its own.
                assert!(!brute_force_linearizable(&v[0].ops), "case {case}");
            }
        }
        assert!(lin > 500 && non > 500, "{lin} linearizable, {non} not");
    }

    // ----- locks -----

    #[test]
    fn locks_clean_history_passes() {
        let ops = vec![
            acq(1, 10, 0, 10),
            fw(1, 10, 11, 20, 30),
            acq(1, 10, 32, 35), // re-acquire while holding: same token
            rel(1, 40, 50),
            acq(2, 12, 45, 60), // blocked behind p1, granted at its release
            fw(2, 12, 13, 70, 80),
            fw(2, 12, 14, 70 + 20, 100),
            fail(fw(1, 10, 0, 110, 120)), // stale token refused
            rel(2, 140, 150),
            acq(4, 20, 160, 170),
            fw(4, 20, 21, 175, 180),
        ];
        assert!(check_locks(&ops).is_empty(), "{:#?}", check_locks(&ops));
    }

    #[test]
    fn locks_duplicate_token_across_processes_flagged() {
        let ops = vec![acq(1, 10, 0, 10), acq(2, 10, 5, 15)];
        let v = check_locks(&ops);
        assert_eq!(names(&v), vec![LOCK_DUPLICATE_TOKEN]);
        assert_eq!(v[0].ops.len(), 2);
    }

    #[test]
    fn locks_token_going_backwards_in_real_time_flagged() {
        let ops = vec![acq(1, 20, 0, 10), rel(1, 11, 12), acq(2, 15, 20, 30)];
        let v = check_locks(&ops);
        assert_eq!(names(&v), vec![LOCK_TOKEN_ORDER]);
        assert_eq!(v[0].ops, vec![ops[0].clone(), ops[2].clone()]);
        // Concurrent acquires may be granted in either order.
        let ops = vec![acq(1, 20, 0, 10), acq(2, 15, 5, 30)];
        assert!(check_locks(&ops).is_empty());
        // The same process never sees its token go down.
        let ops = vec![acq(1, 20, 0, 10), rel(1, 11, 12), acq(1, 15, 20, 30)];
        assert_eq!(names(&check_locks(&ops)), vec![LOCK_TOKEN_ORDER]);
    }

    #[test]
    fn locks_fenced_writes_out_of_token_order_flagged() {
        let ops = vec![
            acq(1, 10, 0, 10),
            acq(2, 12, 20, 30), // p1's lease expired meanwhile
            fw(2, 12, 13, 40, 60),
            fw(1, 10, 14, 45, 65), // the stale holder's write accepted after the newer one
        ];
        let v = check_locks(&ops);
        // Also stale: token 12 was granted (index 12) before revision 14.
        assert_eq!(names(&v), vec![LOCK_FENCED_ORDER, LOCK_STALE_TOKEN]);
        assert_eq!(v[0].ops, vec![ops[2].clone(), ops[3].clone()]);
        assert_eq!(v[1].ops, vec![ops[1].clone(), ops[3].clone()]);
        // Equal tokens in a row are fine.
        let ops = vec![
            acq(1, 10, 0, 10),
            fw(1, 10, 11, 20, 30),
            fw(1, 10, 12, 40, 50),
        ];
        assert!(check_locks(&ops).is_empty());
    }

    fn hold(o: Operation, valid_until: u64) -> Operation {
        Operation {
            valid_until_ns: Some(valid_until),
            ..o
        }
    }
    fn rel_t(p: u64, token: u64, inv: u64, comp: u64) -> Operation {
        Operation {
            token: Some(token),
            ..rel(p, inv, comp)
        }
    }
    fn fenced(o: Operation) -> Operation {
        Operation {
            outcome: Kind::Fail,
            error: Some("fenced".into()),
            revision: None,
            ..o
        }
    }
    const MS: u64 = 1_000_000;

    #[test]
    fn locks_stale_token_accepted_after_a_later_grant_flagged() {
        // p1's lease expired; p2 was granted at index 12 and has not written yet; p1's write
        // with token 10 is accepted at revision 13: nothing else catches that.
        let ops = vec![acq(1, 10, 0, 10), acq(2, 12, 20, 30), fw(1, 10, 13, 40, 50)];
        let v = check_locks(&ops);
        assert_eq!(names(&v), vec![LOCK_STALE_TOKEN]);
        assert_eq!(v[0].ops, vec![ops[1].clone(), ops[2].clone()]);
        // Accepted before the later grant's index: fine (the write came first in the log).
        let ops = vec![acq(1, 10, 0, 10), fw(1, 10, 11, 12, 25), acq(2, 12, 20, 30)];
        assert!(check_locks(&ops).is_empty(), "{:#?}", check_locks(&ops));
    }

    #[test]
    fn locks_grant_inside_a_guaranteed_lease_hold_flagged() {
        // p1 holds token 10; its lease lives until 1000 ms at least and it never released.
        let p1 = hold(acq(1, 10, 0, 10 * MS), 1000 * MS);
        let early = acq(2, 12, 20 * MS, 500 * MS);
        let ops = vec![p1.clone(), early.clone()];
        let v = check_locks(&ops);
        assert_eq!(names(&v), vec![LOCK_LEASE_HOLD]);
        assert_eq!(v[0].ops, vec![p1.clone(), early]);
        // After the lease's guaranteed life: the cluster may expire it.
        let late = acq(2, 12, 20 * MS, 1001 * MS);
        assert!(check_locks(&[p1.clone(), late]).is_empty());
        // After a release was invoked (whatever its outcome): fine.
        let ops = vec![
            p1.clone(),
            info(rel_t(1, 10, 300 * MS, 0)),
            acq(2, 12, 20 * MS, 500 * MS),
        ];
        assert!(check_locks(&ops).is_empty(), "{:#?}", check_locks(&ops));
        // A release of another token does not end this hold.
        let ops = vec![
            p1.clone(),
            rel_t(1, 9, 300 * MS, 310 * MS),
            acq(2, 12, 20 * MS, 500 * MS),
        ];
        assert_eq!(names(&check_locks(&ops)), vec![LOCK_LEASE_HOLD]);
        // Without a recorded lease life nothing is inferred.
        let ops = vec![acq(1, 10, 0, 10 * MS), acq(2, 12, 20 * MS, 500 * MS)];
        assert!(check_locks(&ops).is_empty());
    }

    #[test]
    fn locks_fenced_refusal_inside_a_guaranteed_lease_hold_flagged() {
        let p1 = hold(acq(1, 10, 0, 10 * MS), 1000 * MS);
        let refused = fenced(fw(1, 10, 0, 20 * MS, 30 * MS));
        let v = check_locks(&[p1.clone(), refused.clone()]);
        assert_eq!(names(&v), vec![LOCK_LEASE_HOLD]);
        assert_eq!(v[0].ops, vec![p1.clone(), refused]);
        // Refused after the lease could have expired: the expected outcome of a stale holder.
        let stale = fenced(fw(1, 10, 0, 1100 * MS, 1110 * MS));
        assert!(check_locks(&[p1.clone(), stale]).is_empty());
        // A failure for another reason says nothing about the hold.
        let other = Operation {
            error: Some("unavailable".into()),
            ..fenced(fw(1, 10, 0, 20 * MS, 30 * MS))
        };
        assert!(check_locks(&[p1, other]).is_empty());
    }

    #[test]
    fn locks_revision_against_real_time_flagged() {
        let ops = vec![
            acq(1, 10, 0, 10),
            fw(1, 10, 15, 20, 30),
            fw(1, 10, 12, 40, 50),
        ];
        assert_eq!(names(&check_locks(&ops)), vec![LOCK_REVISION_ORDER]);
    }

    #[test]
    fn locks_write_with_ungranted_token_flagged() {
        let ops = vec![acq(1, 10, 0, 10), fw(1, 99, 100, 20, 30)];
        let v = check_locks(&ops);
        assert_eq!(names(&v), vec![LOCK_UNKNOWN_TOKEN]);
        assert!(v[0].message.contains("no acquire granted"));
        // An Info acquire may have granted it.
        let ops = vec![
            acq(1, 10, 0, 10),
            info(acq(2, 0, 5, 0)),
            fw(1, 99, 100, 20, 30),
        ];
        assert!(check_locks(&ops).is_empty());
    }

    #[test]
    fn locks_malformed_flagged() {
        let mut a = acq(1, 10, 0, 10);
        a.token = None;
        let mut f = fw(1, 10, 11, 20, 30);
        f.revision = None;
        let v = check_locks(&[a, f]);
        assert_eq!(names(&v), vec![HISTORY_MALFORMED, HISTORY_MALFORMED]);
    }

    // ----- semaphores -----

    #[test]
    fn semaphore_over_capacity_flagged() {
        let ops = vec![
            sacq(1, 2, 0, 10),
            sacq(2, 2, 0, 20),
            sacq(3, 2, 0, 30),
            srel(1, 40, 50),
            srel(2, 40, 50),
            srel(3, 40, 50),
        ];
        let v = check_semaphores(&ops);
        assert_eq!(names(&v), vec![SEMAPHORE_CAPACITY]);
        assert_eq!(v[0].ops, ops[..3].to_vec());
        assert!(v[0].message.contains("t=30"), "{}", v[0].message);
    }

    #[test]
    fn semaphore_clean_history_passes() {
        let ops = vec![
            sacq(1, 2, 0, 10),
            sacq(2, 2, 0, 20),
            sacq(3, 2, 0, 50), // completes exactly when p1 invokes its release
            srel(1, 50, 60),
            sacq(1, 2, 70, 80), // after p2 released
            srel(2, 65, 75),
            sacq(3, 2, 85, 90), // idempotent re-acquire while holding
            info(sacq(4, 2, 0, 0)),
            fail(sacq(5, 2, 0, 5)),
            srel(3, 100, 110),
            srel(1, 100, 110),
        ];
        assert!(
            check_semaphores(&ops).is_empty(),
            "{:#?}",
            check_semaphores(&ops)
        );
    }

    #[test]
    fn semaphore_retired_holder_stops_counting() {
        let ops = vec![
            sacq(1, 1, 0, 10),
            info(r(1, "k", None, 30, 0)), // p1 retired: its lease may expire
            sacq(2, 1, 20, 40),
        ];
        assert!(check_semaphores(&ops).is_empty());
        // Without the retirement the overlap is definite.
        let ops = vec![sacq(1, 1, 0, 10), sacq(2, 1, 20, 40)];
        assert_eq!(names(&check_semaphores(&ops)), vec![SEMAPHORE_CAPACITY]);
    }

    #[test]
    fn semaphore_hold_ends_when_the_lease_may_have_expired() {
        // p1's lease is only guaranteed until t=25: p2's grant at t=40 may be the hand-off.
        let mut a = sacq(1, 1, 0, 10);
        a.valid_until_ns = Some(25);
        let ops = vec![a.clone(), sacq(2, 1, 20, 40), srel(1, 50, 60)];
        assert!(check_semaphores(&ops).is_empty());
        // While the lease is guaranteed alive, the overlap is a violation.
        a.valid_until_ns = Some(45);
        let ops = vec![a, sacq(2, 1, 20, 40), srel(1, 50, 60)];
        assert_eq!(names(&check_semaphores(&ops)), vec![SEMAPHORE_CAPACITY]);
    }

    // ----- barriers -----

    #[test]
    fn barrier_clean_history_passes() {
        let ops = vec![
            // Generation 1: all three parties, overlapping; the release touches p3's invoke.
            bw(1, 1, 10, 0, 30),
            bw(2, 1, 10, 5, 31),
            bw(3, 1, 10, 30, 32),
            // Generation 2: two ok, the third party's answer was lost (Info): may have been any
            // lease, at any time.
            bw(1, 2, 14, 40, 60),
            bw(2, 2, 14, 45, 61),
            info(bw_open(3, 35, 0)),
            // Timeouts and refusals say nothing.
            fail(bw_open(4, 20, 38)),
            fail(bw_open(5, 62, 70)),
            // Generation 3 never shows (all its answers lost); generation 4 with a new process
            // replacing the retired p3, concurrent with p2's slow generation-2 answer.
            info(bw_open(6, 65, 0)),
            bw(7, 4, 30, 58, 90),
            bw(1, 4, 30, 70, 91),
            bw(2, 4, 30, 75, 92),
            // A barrier of another name is checked on its own (its generations restart at 1).
            Operation {
                key: "other".into(),
                ..bw(8, 1, 5, 100, 110)
            },
        ];
        let v = check_barriers(&ops);
        assert!(v.is_empty(), "{v:#?}");
        // check_all runs it too.
        let mut h = History::new();
        for o in &ops {
            let mut e = Event::new(o.process, Kind::Invoke, o.op, &o.key, o.invoke_ns);
            e.capacity = o.capacity;
            h.push(e);
        }
        for o in &ops {
            let mut e = Event::new(o.process, o.outcome, o.op, &o.key, 0);
            e.value = o.value;
            e.token = o.token;
            match o.complete_ns {
                Some(c) => e.time_ns = c,
                None => continue,
            }
            h.push(e);
        }
        // Processes complete in recorded order: sort by time, completions after invokes at ties.
        h.events
            .sort_by_key(|e| (e.time_ns, e.kind != Kind::Invoke));
        assert!(check_all(&h).unwrap().is_empty());
    }

    #[test]
    fn barrier_more_oks_than_parties_flagged() {
        let ops = vec![
            bw(1, 1, 10, 0, 30),
            bw(2, 1, 10, 0, 30),
            bw(3, 1, 10, 0, 30),
            bw(4, 1, 10, 0, 30),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(
            v[0].message.contains("4 ok waits, more than its 3"),
            "{v:#?}"
        );
        assert_eq!(v[0].ops, ops);
        // Mismatched parties within one generation.
        let mut odd = bw(3, 1, 10, 0, 30);
        odd.capacity = Some(2);
        let v = check_barriers(&[bw(1, 1, 10, 0, 30), bw(2, 1, 10, 0, 30), odd]);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("different parties"), "{v:#?}");
    }

    #[test]
    fn barrier_token_rules_flagged() {
        // One generation, two tokens.
        let ops = vec![
            bw(1, 1, 10, 0, 30),
            bw(2, 1, 10, 0, 30),
            bw(3, 1, 11, 0, 30),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("different tokens"), "{v:#?}");
        // A later generation with a token not above the earlier one's (equal, then lower).
        for t in [10, 7] {
            let ops = vec![bw(1, 1, 10, 0, 30), bw(2, 3, t, 40, 50)];
            let v = check_barriers(&ops);
            assert_eq!(names(&v), vec![BARRIER_RELEASE], "{v:#?}");
            assert!(v[0].message.contains("tokens must increase"), "{v:#?}");
            assert_eq!(v[0].ops, ops);
        }
    }

    #[test]
    fn barrier_released_before_last_party_arrived_flagged() {
        // All three parties ok, but p1 was answered before p3 had even invoked its wait.
        let ops = vec![
            bw(1, 1, 10, 0, 20),
            bw(2, 1, 10, 5, 40),
            bw(3, 1, 10, 25, 40),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("all 3 parties are ok"), "{v:#?}");
        assert!(v[0].message.contains("released before every party"));
        assert_eq!(v[0].ops, vec![ops[0].clone(), ops[2].clone()]);
        // The same with the third party unknown: the two ok waits alone prove it (an ok wait
        // arrived before the release and was answered after it, whatever the Info did).
        let ops = vec![
            bw(1, 1, 10, 0, 20),
            bw(2, 1, 10, 25, 40),
            info(bw_open(3, 0, 0)),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("2 ok waits, 3 parties"), "{v:#?}");
        // Overlapping (and touching) intervals are fine.
        let ops = vec![
            bw(1, 1, 10, 0, 25),
            bw(2, 1, 10, 5, 40),
            bw(3, 1, 10, 25, 40),
        ];
        assert!(check_barriers(&ops).is_empty());
    }

    #[test]
    fn barrier_generations_against_real_time_flagged() {
        // One process: generation 1 after it had passed generation 2.
        let ops = vec![
            bw(1, 2, 9, 0, 10),
            bw(2, 2, 9, 0, 10),
            bw(3, 2, 9, 0, 10),
            bw(4, 1, 5, 5, 35),
            bw(5, 1, 5, 5, 35),
            bw(1, 1, 5, 20, 30),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("process p1"), "{v:#?}");
        assert_eq!(v[0].ops, vec![ops[0].clone(), ops[5].clone()]);
        // One process passing the same generation twice.
        let ops = vec![bw(1, 1, 5, 0, 10), bw(2, 1, 5, 0, 10), bw(1, 1, 5, 20, 30)];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("p1 passed it twice"), "{v:#?}");
        // Across processes: p4 invoked after generation 3 was released to p1, yet passed 2.
        let ops = vec![
            bw(1, 3, 12, 0, 10),
            bw(2, 3, 12, 0, 10),
            bw(3, 3, 12, 0, 10),
            bw(5, 2, 9, 5, 30),
            bw(6, 2, 9, 5, 30),
            bw(4, 2, 9, 20, 30),
        ];
        let v = check_barriers(&ops);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("p4 after p1"), "{v:#?}");
        // p5 and p6 were concurrent with generation 3's release: either order is possible.
        let ops = vec![bw(1, 3, 12, 0, 10), bw(5, 2, 9, 5, 30), bw(6, 2, 9, 10, 30)];
        assert!(check_barriers(&ops).is_empty());
    }

    #[test]
    fn barrier_malformed_and_generation_zero_flagged() {
        let mut no_token = bw(1, 1, 10, 0, 30);
        no_token.token = None;
        let mut no_parties = bw(2, 1, 10, 0, 30);
        no_parties.capacity = None;
        let no_generation = bw_open(3, 0, 30);
        let v = check_barriers(&[no_token, no_parties, no_generation]);
        assert_eq!(
            names(&v),
            vec![HISTORY_MALFORMED, HISTORY_MALFORMED, HISTORY_MALFORMED]
        );
        let v = check_barriers(&[bw(1, 0, 10, 0, 30)]);
        assert_eq!(names(&v), vec![BARRIER_RELEASE]);
        assert!(v[0].message.contains("start at 1"), "{v:#?}");
    }

    #[test]
    fn check_all_pairs_and_runs_everything() {
        let mut h = History::new();
        let mut e = Event::new(1, Kind::Invoke, OpKind::Write, "k", 0);
        e.value = Some(1);
        h.push(e);
        h.push(Event::new(1, Kind::Ok, OpKind::Write, "k", 10));
        h.push(Event::new(2, Kind::Invoke, OpKind::Read, "k", 20));
        h.push(Event::new(2, Kind::Ok, OpKind::Read, "k", 30)); // absent: lost write
        h.push(Event::new(3, Kind::Invoke, OpKind::Acquire, "L", 0));
        let mut e = Event::new(3, Kind::Ok, OpKind::Acquire, "L", 5);
        e.token = Some(7);
        h.push(e);
        let mut e = Event::new(4, Kind::Invoke, OpKind::SemAcquire, "S", 0);
        e.capacity = Some(1);
        h.push(e);
        h.push(Event::new(4, Kind::Ok, OpKind::SemAcquire, "S", 5));
        let v = check_all(&h).unwrap();
        assert_eq!(names(&v), vec![REGISTER]);
        h.push(Event::new(9, Kind::Ok, OpKind::Read, "k", 40));
        assert!(check_all(&h).is_err());
    }
}

//! Chaos-run history: the events a client records, and their pairing into operations.
//!
//! Purpose: the chaos runner appends one [`Event`] per invocation and per completion, in the order
//! it observed them, and stores the run as JSON lines (one event per line). The checkers in
//! `crate::chaos::check` never look at events directly; they work on [`Operation`]s produced by
//! [`History::pair`].
//!
//! Invariants of a well-formed history (Jepsen's model), enforced by [`History::pair`]:
//! - every completion (`ok`, `fail`, `info`) repeats the `process`, `op` and `key` of the invoke it
//!   completes, and is not earlier than it (`time_ns`);
//! - a process has at most one outstanding operation;
//! - `ok` means the operation took effect, `fail` means it certainly did not, `info` means the
//!   outcome is unknown: it may take effect at any time after its invoke, or never;
//! - a process is retired after an `info` and never reused (a fresh process id replaces it);
//! - an invoke with no completion by the end of the history counts as `info`.
//!
//! Field meaning per op is documented on [`Event`]. Optional fields are omitted from the JSON when
//! absent and default to `None` when read back, so lines stay short and old files stay readable.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// What an event records: an invocation or one of the three completions.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The client is about to send the request.
    Invoke,
    /// The operation took effect.
    Ok,
    /// The operation certainly did not take effect.
    Fail,
    /// Unknown outcome (timeout, connection reset, ...). The process is retired.
    Info,
}

/// The operation a client performs.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Linearizable read of a register key.
    Read,
    /// Unconditional write of a register key.
    Write,
    /// Compare-and-set: write `value` iff the current value equals `expected`.
    Cas,
    /// Acquire the lock named `key`; `ok` carries the fencing token.
    Acquire,
    /// Release the lock named `key`.
    Release,
    /// A write guarded by the fencing token `token` of the lock named `key`.
    FencedWrite,
    /// Take one permit of the semaphore named `key` (of `capacity` permits).
    SemAcquire,
    /// Give back the permit of the semaphore named `key`.
    SemRelease,
    /// Wait at the barrier named `key` (of `capacity` parties); `ok` carries the released
    /// generation in `value` and the release token in `token`.
    BarrierWait,
}

/// One line of the history file.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    /// Client process id; retired after an `info`, never reused.
    pub process: u64,
    pub kind: Kind,
    pub op: OpKind,
    /// Register key, or lock / semaphore name.
    pub key: String,
    /// Write/FencedWrite: value written; Read ok: value read (`None` = key absent); Cas: new value;
    /// BarrierWait ok: the generation released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
    /// Cas: expected old value (`None` = expected absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<i64>,
    /// Acquire ok: granted token; FencedWrite: token used; Release: token of the hold it ends;
    /// BarrierWait ok: release token (the log index of the releasing entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// FencedWrite/Write ok: revision (log index) the cluster answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// SemAcquire: capacity of the semaphore; BarrierWait: parties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// SemAcquire, Acquire: the monotonic time until which the lease is guaranteed alive (the
    /// lease grant's invoke plus its TTL; the cluster's deadline can only be later). A hold
    /// counts no longer than this: after it the cluster may expire the lease and hand the
    /// permit or lock on. Before it, only a release ends the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until_ns: Option<u64>,
    /// Node the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Monotonic time since the run started.
    pub time_ns: u64,
    /// Fail/Info: error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Event {
    /// An event with every optional field absent.
    pub fn new(process: u64, kind: Kind, op: OpKind, key: impl Into<String>, time_ns: u64) -> Self {
        Event {
            process,
            kind,
            op,
            key: key.into(),
            value: None,
            expected: None,
            token: None,
            revision: None,
            capacity: None,
            valid_until_ns: None,
            node: None,
            time_ns,
            error: None,
        }
    }
}

/// An invoke matched with its completion.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Operation {
    pub process: u64,
    pub op: OpKind,
    pub key: String,
    /// Value written (Write, FencedWrite) or Cas new value, from the invoke; BarrierWait: the
    /// generation released (from the `ok` completion).
    pub value: Option<i64>,
    /// Cas expected value, from the invoke.
    pub expected: Option<i64>,
    /// Acquire, BarrierWait: granted / release token (from the completion); FencedWrite: token used.
    pub token: Option<u64>,
    /// Revision the cluster answered (from the completion).
    pub revision: Option<u64>,
    /// SemAcquire capacity; BarrierWait parties.
    pub capacity: Option<u64>,
    /// SemAcquire, Acquire: the hold is void after this time (see `Event::valid_until_ns`).
    pub valid_until_ns: Option<u64>,
    /// `Ok`, `Fail` or `Info` (never `Invoke`; an uncompleted invoke is `Info`).
    pub outcome: Kind,
    pub invoke_ns: u64,
    /// Completion time of `Ok` and `Fail`; `None` for `Info` (its effect may land at any later time).
    pub complete_ns: Option<u64>,
    /// Read `ok`: the value read (`None` = key absent).
    pub result_value: Option<i64>,
    /// Fail/Info: the error code of the completion.
    #[serde(default)]
    pub error: Option<String>,
}

/// A whole run: events in the order the runner recorded them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    pub fn new() -> Self {
        History::default()
    }

    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    /// One JSON object per line, each line ending in `\n`.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            // Serializing plain data with string keys cannot fail.
            out.push_str(&serde_json::to_string(e).expect("event serializes"));
            out.push('\n');
        }
        out
    }

    /// Parses the output of [`History::to_jsonl`]; blank lines are skipped. Errors name the line.
    pub fn from_jsonl(s: &str) -> Result<History, String> {
        let mut events = Vec::new();
        for (i, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let e: Event =
                serde_json::from_str(line).map_err(|err| format!("line {}: {}", i + 1, err))?;
            events.push(e);
        }
        Ok(History { events })
    }

    /// Matches every invoke with its completion, in invoke order.
    ///
    /// Errors: a completion with no outstanding invoke for its process, a second invoke while one
    /// is outstanding, an invoke by a process retired by an earlier `info`, a completion whose op
    /// or key differs from its invoke, or a completion earlier than its invoke.
    pub fn pair(&self) -> Result<Vec<Operation>, String> {
        let mut ops: Vec<Operation> = Vec::new();
        let mut outstanding: HashMap<u64, usize> = HashMap::new();
        let mut retired: HashSet<u64> = HashSet::new();
        for (i, e) in self.events.iter().enumerate() {
            match e.kind {
                Kind::Invoke => {
                    if let Some(&j) = outstanding.get(&e.process) {
                        return Err(format!(
                            "event {i}: process {} invokes {:?} while its {:?} invoked at {} ns is outstanding",
                            e.process, e.op, ops[j].op, ops[j].invoke_ns
                        ));
                    }
                    if retired.contains(&e.process) {
                        return Err(format!(
                            "event {i}: process {} invokes {:?} after it was retired by an info",
                            e.process, e.op
                        ));
                    }
                    outstanding.insert(e.process, ops.len());
                    ops.push(Operation {
                        process: e.process,
                        op: e.op,
                        key: e.key.clone(),
                        value: e.value,
                        expected: e.expected,
                        token: e.token,
                        revision: e.revision,
                        capacity: e.capacity,
                        valid_until_ns: e.valid_until_ns,
                        outcome: Kind::Info,
                        invoke_ns: e.time_ns,
                        complete_ns: None,
                        result_value: None,
                        error: None,
                    });
                }
                Kind::Ok | Kind::Fail | Kind::Info => {
                    let Some(j) = outstanding.remove(&e.process) else {
                        return Err(format!(
                            "event {i}: {:?} completion of {:?} by process {} without an outstanding invoke",
                            e.kind, e.op, e.process
                        ));
                    };
                    let o = &mut ops[j];
                    if o.op != e.op || o.key != e.key {
                        return Err(format!(
                            "event {i}: process {} completes {:?} {:?} but invoked {:?} {:?}",
                            e.process, e.op, e.key, o.op, o.key
                        ));
                    }
                    if e.time_ns < o.invoke_ns {
                        return Err(format!(
                            "event {i}: process {} completes at {} ns before its invoke at {} ns",
                            e.process, e.time_ns, o.invoke_ns
                        ));
                    }
                    o.outcome = e.kind;
                    o.value = o
                        .value
                        .or(if o.op == OpKind::Read { None } else { e.value });
                    o.expected = o.expected.or(e.expected);
                    o.token = e.token.or(o.token);
                    o.revision = e.revision.or(o.revision);
                    o.capacity = o.capacity.or(e.capacity);
                    o.valid_until_ns = o.valid_until_ns.or(e.valid_until_ns);
                    o.error = e.error.clone();
                    match e.kind {
                        Kind::Info => {
                            retired.insert(e.process);
                        }
                        _ => o.complete_ns = Some(e.time_ns),
                    }
                    if o.op == OpKind::Read && e.kind == Kind::Ok {
                        o.result_value = e.value;
                    }
                }
            }
        }
        // Invokes left outstanding are Info already (outcome and complete_ns as initialised).
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: u64, kind: Kind, op: OpKind, key: &str, t: u64) -> Event {
        Event::new(process, kind, op, key, t)
    }

    #[test]
    fn jsonl_round_trip() {
        let mut h = History::new();
        let mut e = ev(1, Kind::Invoke, OpKind::Cas, "k", 5);
        e.value = Some(3);
        e.expected = Some(-2);
        e.node = Some(2);
        h.push(e);
        let mut e = ev(1, Kind::Fail, OpKind::Cas, "k", 9);
        e.error = Some("precondition_failed".into());
        h.push(e);
        let mut e = ev(2, Kind::Ok, OpKind::FencedWrite, "lock/a", 11);
        e.token = Some(u64::MAX);
        e.revision = Some(17);
        e.capacity = Some(4);
        e.value = Some(i64::MIN);
        h.push(e);
        h.push(ev(3, Kind::Info, OpKind::SemRelease, "sem \"x\"\n", 12));
        let s = h.to_jsonl();
        assert_eq!(s.lines().count(), 4);
        assert!(s.ends_with('\n'));
        assert!(s.contains("\"kind\":\"invoke\""));
        assert!(s.contains("\"op\":\"fenced_write\""));
        assert!(s.contains("\"op\":\"sem_release\""));
        assert!(
            !s.lines().next().unwrap().contains("token"),
            "absent fields are omitted"
        );
        assert_eq!(History::from_jsonl(&s).unwrap(), h);
        // Blank lines are tolerated; explicit nulls read as None.
        let with_blank = format!("\n{s}\n\n");
        assert_eq!(History::from_jsonl(&with_blank).unwrap(), h);
        let null_line =
            r#"{"process":1,"kind":"ok","op":"read","key":"k","value":null,"time_ns":3}"#;
        let parsed = History::from_jsonl(null_line).unwrap();
        assert_eq!(parsed.events[0], ev(1, Kind::Ok, OpKind::Read, "k", 3));
    }

    #[test]
    fn jsonl_error_names_line() {
        let good = r#"{"process":1,"kind":"invoke","op":"read","key":"k","time_ns":3}"#;
        let bad = r#"{"process":1,"kind":"maybe","op":"read","key":"k","time_ns":3}"#;
        let err = History::from_jsonl(&format!("{good}\n{bad}\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn pair_matches_and_fills_fields() {
        let mut h = History::new();
        let mut w = ev(1, Kind::Invoke, OpKind::Write, "k", 0);
        w.value = Some(7);
        h.push(w);
        h.push(ev(2, Kind::Invoke, OpKind::Read, "k", 1));
        let mut wok = ev(1, Kind::Ok, OpKind::Write, "k", 4);
        wok.revision = Some(10);
        h.push(wok);
        let mut rok = ev(2, Kind::Ok, OpKind::Read, "k", 5);
        rok.value = Some(7);
        h.push(rok);
        h.push(ev(3, Kind::Invoke, OpKind::Acquire, "l", 6));
        let mut aok = ev(3, Kind::Ok, OpKind::Acquire, "l", 8);
        aok.token = Some(12);
        h.push(aok);
        let mut c = ev(1, Kind::Invoke, OpKind::Cas, "k", 9);
        c.expected = Some(7);
        c.value = Some(8);
        h.push(c);
        h.push(ev(1, Kind::Info, OpKind::Cas, "k", 20));
        h.push(ev(2, Kind::Invoke, OpKind::Read, "k", 21)); // never completes
        let ops = h.pair().unwrap();
        assert_eq!(ops.len(), 5);
        assert_eq!(ops[0].op, OpKind::Write);
        assert_eq!(ops[0].value, Some(7));
        assert_eq!(ops[0].revision, Some(10));
        assert_eq!(ops[0].outcome, Kind::Ok);
        assert_eq!((ops[0].invoke_ns, ops[0].complete_ns), (0, Some(4)));
        assert_eq!(ops[1].result_value, Some(7));
        assert_eq!(ops[1].value, None);
        assert_eq!(ops[2].token, Some(12));
        assert_eq!((ops[3].expected, ops[3].value), (Some(7), Some(8)));
        assert_eq!((ops[3].outcome, ops[3].complete_ns), (Kind::Info, None));
        assert_eq!((ops[4].outcome, ops[4].complete_ns), (Kind::Info, None));
        assert_eq!(ops[4].result_value, None);
    }

    #[test]
    fn barrier_wait_round_trips_and_pairs() {
        let mut h = History::new();
        let mut inv = ev(4, Kind::Invoke, OpKind::BarrierWait, "b", 10);
        inv.capacity = Some(3);
        h.push(inv);
        let mut done = ev(4, Kind::Ok, OpKind::BarrierWait, "b", 20);
        done.capacity = Some(3);
        done.value = Some(2);
        done.token = Some(41);
        h.push(done);
        let s = h.to_jsonl();
        assert!(s.contains("\"op\":\"barrier_wait\""), "{s}");
        assert_eq!(History::from_jsonl(&s).unwrap(), h);
        let ops = h.pair().unwrap();
        assert_eq!(ops.len(), 1);
        let o = &ops[0];
        assert_eq!((o.op, o.outcome), (OpKind::BarrierWait, Kind::Ok));
        assert_eq!((o.capacity, o.value, o.token), (Some(3), Some(2), Some(41)));
        assert_eq!((o.invoke_ns, o.complete_ns), (10, Some(20)));
    }

    #[test]
    fn pair_errors() {
        // Completion without invoke.
        let h = History {
            events: vec![ev(1, Kind::Ok, OpKind::Read, "k", 1)],
        };
        assert!(h
            .pair()
            .unwrap_err()
            .contains("without an outstanding invoke"));
        // Second invoke while one is outstanding.
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 1),
                ev(1, Kind::Invoke, OpKind::Write, "k", 2),
            ],
        };
        assert!(h.pair().unwrap_err().contains("outstanding"));
        // Reuse of a process retired by an info.
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 1),
                ev(1, Kind::Info, OpKind::Read, "k", 2),
                ev(1, Kind::Invoke, OpKind::Read, "k", 3),
            ],
        };
        assert!(h.pair().unwrap_err().contains("retired"));
        // Completion of a different op or key.
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 1),
                ev(1, Kind::Ok, OpKind::Write, "k", 2),
            ],
        };
        assert!(h.pair().unwrap_err().contains("but invoked"));
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 1),
                ev(1, Kind::Ok, OpKind::Read, "j", 2),
            ],
        };
        assert!(h.pair().unwrap_err().contains("but invoked"));
        // Completion before invoke.
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 5),
                ev(1, Kind::Ok, OpKind::Read, "k", 2),
            ],
        };
        assert!(h.pair().unwrap_err().contains("before its invoke"));
        // A completed op followed by a new invoke of the same process is fine.
        let h = History {
            events: vec![
                ev(1, Kind::Invoke, OpKind::Read, "k", 1),
                ev(1, Kind::Fail, OpKind::Read, "k", 2),
                ev(1, Kind::Invoke, OpKind::Read, "k", 3),
            ],
        };
        assert_eq!(h.pair().unwrap().len(), 2);
    }
}

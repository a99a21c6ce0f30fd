//! The node's watch history: the change events of every applied entry, in apply order, kept
//! in memory up to a bound. Watchers read it with a cursor (an event sequence number local to
//! this node) and block on the applied-index channel for more.
//!
//! Retention: every event whose revision is at least `oldest_revision` is here. It starts just
//! after the snapshot the node loaded (openraft replays the log after it, which regenerates
//! those events), moves up when the bound evicts events, and jumps to the snapshot's index when
//! a snapshot is installed from the leader (the entries it covers are never applied here).

use std::collections::VecDeque;

use crate::sm::Event;

/// Default number of events kept.
pub const DEFAULT_WATCH_HISTORY: usize = 100_000;
/// Default bound on the history's memory, as estimated by [`event_size`]: whichever of the two
/// bounds is reached first evicts the oldest events. 100 000 puts of 256-byte values would
/// otherwise hold over 100 MiB.
pub const DEFAULT_WATCH_HISTORY_BYTES: usize = 32 << 20;

/// An estimate of the heap an event holds (strings, the detail's JSON tree, the overheads).
pub fn event_size(e: &Event) -> usize {
    fn value(v: &serde_json::Value) -> usize {
        use serde_json::Value::*;
        match v {
            Null | Bool(_) | Number(_) => 16,
            String(s) => 24 + s.len(),
            Array(a) => 24 + a.iter().map(value).sum::<usize>(),
            Object(m) => {
                48 + m
                    .iter()
                    .map(|(k, v)| 56 + k.len() + value(v))
                    .sum::<usize>()
            }
        }
    }
    128 + e.kind.len() + e.name.len() + e.action.len() + value(&e.detail)
}

pub struct WatchLog {
    /// (sequence number, `event_size`, event), sequence numbers consecutive.
    events: VecDeque<(u64, usize, Event)>,
    next_seq: u64,
    /// A cursor below this missed events that are gone.
    first_valid_seq: u64,
    oldest_revision: u64,
    last_revision: u64,
    cap: usize,
    /// Sum of [`event_size`] over `events`, and its bound.
    bytes: usize,
    max_bytes: usize,
}

/// What a watcher gets from one read.
pub enum Read {
    /// New events (possibly none), the cursor to read from next, and the revision everything up
    /// to which has now been delivered.
    Events(Vec<Event>, u64, u64),
    /// The cursor's events are no longer retained; `oldest_revision` is the oldest a new watch
    /// can start from.
    Compacted { oldest_revision: u64 },
}

impl WatchLog {
    pub fn new(cap: usize) -> WatchLog {
        WatchLog {
            events: VecDeque::new(),
            next_seq: 0,
            first_valid_seq: 0,
            oldest_revision: 0,
            last_revision: 0,
            cap: cap.max(1),
            bytes: 0,
            max_bytes: DEFAULT_WATCH_HISTORY_BYTES,
        }
    }

    /// The same log with another memory bound (the newest event is always kept).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> WatchLog {
        self.max_bytes = max_bytes;
        self
    }

    /// Forget everything: the state now starts at `applied` (a loaded or installed snapshot).
    pub fn reset(&mut self, applied: u64) {
        self.events.clear();
        self.bytes = 0;
        // Skip a sequence number: every existing cursor, even one that had read everything,
        // is now before `first_valid_seq` and gets `Compacted` (it would miss what the
        // snapshot covers); new cursors start after the gap.
        self.next_seq += 1;
        self.first_valid_seq = self.next_seq;
        self.oldest_revision = applied + 1;
        self.last_revision = applied;
    }

    /// Record entry `revision` (applied) and its events.
    pub fn push(&mut self, revision: u64, events: Vec<Event>) {
        for e in events {
            let size = event_size(&e);
            self.bytes += size;
            self.events.push_back((self.next_seq, size, e));
            self.next_seq += 1;
        }
        self.last_revision = self.last_revision.max(revision);
        while self.events.len() > self.cap || (self.bytes > self.max_bytes && self.events.len() > 1)
        {
            if let Some((seq, size, e)) = self.events.pop_front() {
                self.bytes -= size;
                self.first_valid_seq = seq + 1;
                // Events of `e.revision` may be split now: that revision is no longer whole.
                self.oldest_revision = self.oldest_revision.max(e.revision + 1);
            }
        }
    }

    pub fn oldest_revision(&self) -> u64 {
        self.oldest_revision
    }

    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }

    /// The cursor of the first event at or after `revision`, or `None` if that is gone.
    pub fn cursor_at(&self, revision: u64) -> Option<u64> {
        if revision < self.oldest_revision {
            return None;
        }
        let i = self
            .events
            .partition_point(|(_, _, e)| e.revision < revision);
        Some(self.events.get(i).map_or(self.next_seq, |(seq, _, _)| *seq))
    }

    /// Events from `cursor` on, at most `max`.
    pub fn read(&self, cursor: u64, max: usize) -> Read {
        if cursor < self.first_valid_seq {
            return Read::Compacted {
                oldest_revision: self.oldest_revision,
            };
        }
        let start = self.events.front().map_or(self.next_seq, |(s, _, _)| *s);
        let skip = (cursor - start) as usize;
        let evs: Vec<Event> = self
            .events
            .iter()
            .skip(skip)
            .take(max)
            .map(|(_, _, e)| e.clone())
            .collect();
        let next = cursor + evs.len() as u64;
        // Delivered through: the last revision if nothing is left, else just before the next.
        let through = match self.events.get(skip + evs.len()) {
            None => self.last_revision,
            Some((_, _, e)) => e.revision.saturating_sub(1),
        };
        Read::Events(evs, next, through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(revision: u64, name: &str) -> Event {
        Event {
            revision,
            kind: "kv".into(),
            name: name.into(),
            action: "put".into(),
            detail: json!({}),
        }
    }

    fn names(r: Read) -> (Vec<(u64, String)>, u64, u64) {
        match r {
            Read::Events(e, next, through) => (
                e.into_iter().map(|e| (e.revision, e.name)).collect(),
                next,
                through,
            ),
            Read::Compacted { .. } => panic!("compacted"),
        }
    }

    #[test]
    fn reads_resume_by_revision_and_report_compaction() {
        let mut w = WatchLog::new(4);
        w.reset(10);
        assert_eq!(w.cursor_at(10), None);
        let c = w.cursor_at(11).unwrap();
        w.push(11, vec![ev(11, "a"), ev(11, "b")]);
        w.push(12, vec![]);
        w.push(13, vec![ev(13, "c")]);
        let (got, next, through) = names(w.read(c, 2));
        assert_eq!(got, vec![(11, "a".into()), (11, "b".into())]);
        assert_eq!(through, 12);
        let (got, next2, through) = names(w.read(next, 10));
        assert_eq!(got, vec![(13, "c".into())]);
        assert_eq!(through, 13);
        // From a revision in the middle, and from the future.
        assert_eq!(
            names(w.read(w.cursor_at(12).unwrap(), 10)).0,
            vec![(13, "c".into())]
        );
        assert_eq!(w.cursor_at(20), Some(next2));
        // Two more events evict a and b: revision 11 is gone, and so is a cursor before them.
        w.push(14, vec![ev(14, "d"), ev(14, "e")]);
        assert_eq!(w.oldest_revision(), 12);
        assert_eq!(w.cursor_at(11), None);
        assert!(matches!(
            w.read(c, 10),
            Read::Compacted {
                oldest_revision: 12
            }
        ));
        assert_eq!(
            names(w.read(next2, 10)).0,
            vec![(14, "d".into()), (14, "e".into())]
        );
        // An installed snapshot invalidates every cursor, even a caught-up one.
        let caught_up = w.cursor_at(15).unwrap();
        assert!(matches!(w.read(caught_up, 10), Read::Events(ref e, _, _) if e.is_empty()));
        w.reset(30);
        assert!(matches!(
            w.read(next2, 10),
            Read::Compacted {
                oldest_revision: 31
            }
        ));
        assert!(matches!(
            w.read(caught_up, 10),
            Read::Compacted {
                oldest_revision: 31
            }
        ));
        let fresh = w.cursor_at(31).unwrap();
        w.push(31, vec![ev(31, "f")]);
        assert_eq!(names(w.read(fresh, 10)).0, vec![(31, "f".into())]);
    }

    #[test]
    fn the_memory_bound_evicts_the_oldest_events_first() {
        let big = |revision: u64, name: &str| Event {
            detail: json!({"value": "x".repeat(1000), "version": 1}),
            ..ev(revision, name)
        };
        let one = event_size(&big(1, "a"));
        assert!(one > 1000, "the value counts: {one}");
        // Room for three such events by bytes, ten by count.
        let mut w = WatchLog::new(10).with_max_bytes(3 * one + one / 2);
        w.reset(0);
        let c = w.cursor_at(1).unwrap();
        for (r, n) in [(1, "a"), (2, "b"), (3, "c")] {
            w.push(r, vec![big(r, n)]);
        }
        assert_eq!(w.oldest_revision(), 1);
        w.push(4, vec![big(4, "d")]);
        assert_eq!(w.oldest_revision(), 2, "a is evicted by bytes");
        assert!(matches!(
            w.read(c, 10),
            Read::Compacted { oldest_revision: 2 }
        ));
        let from2 = w.cursor_at(2).unwrap();
        let got: Vec<String> = names(w.read(from2, 10))
            .0
            .into_iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(got, ["b", "c", "d"]);
        // One event larger than the whole bound is still kept, alone.
        let huge = Event {
            detail: json!({"value": "y".repeat(10 * one)}),
            ..ev(5, "e")
        };
        w.push(5, vec![huge]);
        assert_eq!(w.oldest_revision(), 5);
        let got = names(w.read(w.cursor_at(5).unwrap(), 10)).0;
        assert_eq!(got, vec![(5, "e".into())]);
        // Evictions gave their bytes back: small events fill up again.
        w.push(6, vec![ev(6, "f")]);
        w.push(7, vec![ev(7, "g")]);
        assert_eq!(
            w.oldest_revision(),
            6,
            "the huge one went, the small ones fit"
        );
    }
}

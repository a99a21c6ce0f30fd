//! The table of answered request ids (idempotency keys).
//!
//! Two indexes of the same entries. The time index, keyed by (time, id), holds the answers and
//! gives the order in which ids are forgotten, oldest first; it is what a snapshot holds, as
//! a map from id to `{time_ms, response}` in (time, id) order. The id index maps each id to
//! its answer time, for the lookup on every apply; it is derived from the time index and is
//! not part of the value (snapshots, equality). (Snapshots once held a separate (time, id)
//! list too, a third of a write-heavy node's snapshot; its `dedup_by_time` field is ignored on
//! load.) The (time, id) order is canonical, so a node that applied the entries and a node
//! that loaded a snapshot forget the same ids in the same order.
//!
//! The id index is a plain hash map with a random key (a client picks the ids, so a fixed
//! hash could be flooded): every apply of a request with an id looks it up, inserts it and
//! forgets the oldest, one hash each. Nothing iterates it, so no order depends on the hash.
//! Both indexes share each id's one allocation.
//!
//! The time index is a copy-on-write map (`cow.rs`): a snapshot's copy of the state shares its
//! chunks, and the apply task, which inserts at its end and forgets from its start, copies
//! only the chunks it touches while the snapshot is being encoded. The id index is not copied
//! at all: a copy of the table starts without one and builds it from its time index if it is
//! ever looked up in (a snapshot's copy is only encoded, which reads the time index alone).
//! It used to be a copy-on-write hash map in 64 shards: after every snapshot each shard was
//! copied whole by the first write to it (the whole index, 200 000 ids, on every node every
//! 100 000 entries), and each lookup hashed the id twice (shard, then map). Under put with 256
//! clients that table was 6 % of the leader's CPU and 10 % of a follower's
//! (docs/benchmarks.md).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cow::CowMap;
use super::Response;

/// The first answer to a request id, and when it was given (log time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Dedup {
    pub time_ms: u64,
    pub response: Response,
}

#[derive(Debug, Default)]
pub(super) struct RequestIds {
    /// Each id's answer time: with the id, the key of its entry in `by_time`. Built from
    /// `by_time` when first needed (see [`IdIndex`]).
    by_id: IdIndex,
    by_time: CowMap<(u64, Arc<str>), Dedup>,
}

type IdMap = HashMap<Arc<str>, u64>;

/// The id index, or nothing yet: a copy starts with nothing and builds it from the time index
/// on its first lookup.
#[derive(Debug, Default)]
struct IdIndex(OnceLock<IdMap>);

/// A copy shares the time index's chunks and leaves the id index behind (see the module doc).
impl Clone for RequestIds {
    fn clone(&self) -> Self {
        RequestIds {
            by_id: IdIndex::default(),
            by_time: self.by_time.clone(),
        }
    }
}

/// The id index follows from the time index.
impl PartialEq for RequestIds {
    fn eq(&self, other: &Self) -> bool {
        self.by_time == other.by_time
    }
}

impl Eq for RequestIds {}

fn index_of(by_time: &CowMap<(u64, Arc<str>), Dedup>) -> IdMap {
    let mut ids = HashMap::with_capacity(by_time.len());
    for (time, id) in by_time.keys() {
        ids.insert(id.clone(), *time);
    }
    ids
}

impl RequestIds {
    /// The id index, built first if this table is a copy that has none yet.
    fn ids(&self) -> &IdMap {
        self.by_id.0.get_or_init(|| index_of(&self.by_time))
    }

    fn ids_mut(&mut self) -> &mut IdMap {
        self.ids();
        self.by_id.0.get_mut().expect("the id index was just built")
    }

    pub fn get(&self, id: &str) -> Option<&Dedup> {
        self.by_time.get(&self.time_key(id)?)
    }

    /// The key of `id`'s entry in the time index.
    fn time_key(&self, id: &str) -> Option<(u64, Arc<str>)> {
        let (id, time) = self.ids().get_key_value(id)?;
        Some((*time, id.clone()))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    /// Ids in the id index (for the invariant checks of tests: the same as [`Self::len`]).
    #[cfg(test)]
    pub fn indexed_ids(&self) -> usize {
        self.ids().len()
    }

    /// Remember the first answer to `id` (`Sm::apply` only calls this for an id that is not
    /// in the table; one that is would replace its answer and time).
    pub fn insert(&mut self, id: &str, time_ms: u64, response: Response) {
        let id: Arc<str> = Arc::from(id);
        if let Some(old) = self.ids_mut().insert(id.clone(), time_ms) {
            self.by_time.remove(&(old, id.clone()));
        }
        self.by_time
            .insert((time_ms, id), Dedup { time_ms, response });
    }

    /// Forget the ids answered `retention_ms` or longer before `now`, and then, while more
    /// than `keep` are left, the oldest.
    pub fn forget(&mut self, now: u64, retention_ms: u64, keep: usize) {
        while let Some(((t, _), _)) = self.by_time.first_key_value() {
            if t + retention_ms > now && self.by_time.len() <= keep {
                break;
            }
            if let Some(((_, id), _)) = self.by_time.pop_first() {
                self.ids_mut().remove(&id);
            }
        }
    }

    /// The time index, oldest first (for the invariant checks of tests).
    #[cfg(test)]
    pub fn by_time(&self) -> impl Iterator<Item = &(u64, Arc<str>)> {
        self.by_time.keys()
    }

    #[cfg(test)]
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Dedup> {
        let key = self.time_key(id)?;
        self.by_time.get_mut(&key)
    }

    #[cfg(test)]
    pub fn contains_key(&self, id: &str) -> bool {
        self.ids().contains_key(id)
    }
}

#[cfg(test)]
impl std::ops::Index<&str> for RequestIds {
    type Output = Dedup;
    fn index(&self, id: &str) -> &Dedup {
        self.get(id).expect("a remembered request id")
    }
}

/// The snapshot form is the id map alone: `{"<id>": {"time_ms": .., "response": ..}}`, the
/// same as the `dedup` field of snapshots written before the time index was left out (their
/// `dedup_by_time` field is ignored on load). The ids come in (time, id) order; snapshots
/// written before the hash map have them in id order, which loads the same.
impl Serialize for RequestIds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.by_time.iter().map(|((_, id), d)| (&**id, d)))
    }
}

impl<'de> Deserialize<'de> for RequestIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RequestIds, D::Error> {
        let entries = HashMap::<String, Dedup>::deserialize(d)?;
        let by_time: CowMap<_, _> = entries
            .into_iter()
            .map(|(id, e)| ((e.time_ms, Arc::from(id)), e))
            .collect();
        // Built now, on the load, not by the first apply after it.
        let by_id = IdIndex(OnceLock::from(index_of(&by_time)));
        Ok(RequestIds { by_id, by_time })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ids: &[(&str, u64)]) -> RequestIds {
        let mut t = RequestIds::default();
        for (id, time) in ids {
            t.insert(id, *time, Response::Done);
        }
        t
    }

    #[test]
    fn the_snapshot_form_is_the_id_map_and_loading_rebuilds_the_time_index() {
        let t = table(&[("b", 5), ("a", 7), ("c", 5)]);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "a": {"time_ms": 7, "response": "Done"},
                "b": {"time_ms": 5, "response": "Done"},
                "c": {"time_ms": 5, "response": "Done"},
            })
        );
        let back: RequestIds = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        let order: Vec<_> = back.by_time().map(|(t, id)| (*t, &**id)).collect();
        assert_eq!(order, [(5, "b"), (5, "c"), (7, "a")]);
        // Written in the time index's order, whatever the hash map's.
        let text = serde_json::to_string(&t).unwrap();
        let at = |id: &str| text.find(&format!("\"{id}\"")).unwrap();
        assert!(at("b") < at("c") && at("c") < at("a"), "{text}");
    }

    #[test]
    fn a_copy_builds_its_id_index_from_the_time_index_when_first_looked_up() {
        let mut t = table(&[("b", 5), ("a", 7), ("c", 5)]);
        let mut copy = t.clone();
        assert!(copy.by_id.0.get().is_none());
        // Encoding (a snapshot) reads the time index alone.
        let json = serde_json::to_string(&copy).unwrap();
        assert!(copy.by_id.0.get().is_none());
        assert_eq!(json, serde_json::to_string(&t).unwrap());
        // The original goes on; the copy keeps what it had.
        t.insert("d", 9, Response::Done);
        t.forget(10, 100, 3);
        assert!(!t.contains_key("b"));
        assert_eq!(copy.get("b").map(|d| d.time_ms), Some(5));
        assert!(copy.by_id.0.get().is_some());
        assert!(copy.get("d").is_none());
        // The copy, applied to alike, ends up equal, index and all.
        copy.insert("d", 9, Response::Done);
        copy.forget(10, 100, 3);
        assert_eq!(copy, t);
        assert_eq!(copy.ids(), t.ids());
        assert_eq!(copy.ids().len(), 3);
        // A copy that is only written to builds its index on the first write.
        let mut other = t.clone();
        other.forget(10, 100, 2);
        assert_eq!(other.ids().len(), 2);
        assert!(!other.contains_key("c") && other.contains_key("a"));
    }

    #[test]
    fn inserting_an_id_again_replaces_its_answer_and_time_in_both_indexes() {
        let mut t = table(&[("a", 5), ("b", 6)]);
        t.insert("a", 9, Response::LeaseRevoked { lease_id: 3 });
        assert_eq!(t.len(), 2);
        let order: Vec<_> = t.by_time().map(|(t, id)| (*t, &**id)).collect();
        assert_eq!(order, [(6, "b"), (9, "a")]);
        assert_eq!(t["a"].response, Response::LeaseRevoked { lease_id: 3 });
        t.forget(10, 100, 1);
        assert!(t.contains_key("a") && !t.contains_key("b"));
    }

    #[test]
    fn forget_drops_expired_ids_then_the_oldest_beyond_the_bound() {
        let mut t = table(&[("b", 5), ("a", 7), ("c", 5), ("d", 9)]);
        t.forget(15, 10, 10);
        assert_eq!(t.len(), 2);
        assert!(!t.contains_key("b") && !t.contains_key("c"));
        t.forget(15, 100, 1);
        assert_eq!(t.len(), 1);
        assert!(t.contains_key("d"));
        assert_eq!(t.by_time().count(), 1);
    }
}

//! The table of answered request ids (idempotency keys).
//!
//! Two indexes of the same entries. The time index, keyed by (time, id), holds the answers and
//! gives the order in which ids are forgotten, oldest first; it is what a snapshot holds, as
//! a map from id to `{time_ms, response}` in (time, id) order. The id index maps each id to
//! its answer time, for the lookup on every apply; loading a snapshot rebuilds it. (Snapshots
//! once held a separate (time, id) list too, a third of a write-heavy node's snapshot; its
//! `dedup_by_time` field is ignored on load.) The (time, id) order is canonical, so a node
//! that applied the entries and a node that loaded a snapshot forget the same ids in the same
//! order.
//!
//! The id index is a hash map: every apply of a request with an id looks it up, inserts it and
//! forgets the oldest, and in an ordered map of up to [`super::DEDUP_MAX_IDS`] strings each of
//! those was a walk of some 40 string comparisons through cold memory (`memcmp` and B-tree
//! code were about 5 % of the machine under `put`, docs/benchmarks.md). The time index's keys
//! compare by time first (new ids go to its end). Nothing iterates the hash map, so no order
//! depends on the hash. Both indexes share each id's one allocation.
//!
//! Both indexes are copy-on-write maps (`cow.rs`): a snapshot's copy of the state shares them,
//! and the apply task, which inserts at the time index's end and forgets from its start,
//! copies only the chunks and shards it touches while the snapshot is being encoded.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cow::{CowHashMap, CowMap};
use super::Response;

/// The first answer to a request id, and when it was given (log time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Dedup {
    pub time_ms: u64,
    pub response: Response,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RequestIds {
    /// Each id's answer time: with the id, the key of its entry in `by_time`.
    by_id: CowHashMap<Arc<str>, u64>,
    by_time: CowMap<(u64, Arc<str>), Dedup>,
}

impl RequestIds {
    pub fn get(&self, id: &str) -> Option<&Dedup> {
        self.by_time.get(&self.time_key(id)?)
    }

    /// The key of `id`'s entry in the time index.
    fn time_key(&self, id: &str) -> Option<(u64, Arc<str>)> {
        let (id, time) = self.by_id.get_key_value(id)?;
        Some((*time, id.clone()))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Remember the first answer to `id` (`Sm::apply` only calls this for an id that is not
    /// in the table; one that is would replace its answer and time).
    pub fn insert(&mut self, id: &str, time_ms: u64, response: Response) {
        let id: Arc<str> = Arc::from(id);
        if let Some(old) = self.by_id.insert(id.clone(), time_ms) {
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
                self.by_id.remove(&id);
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
        self.by_id.contains_key(id)
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
        let mut by_id = CowHashMap::with_capacity(entries.len());
        let by_time = entries
            .into_iter()
            .map(|(id, e)| {
                let id: Arc<str> = Arc::from(id);
                by_id.insert(id.clone(), e.time_ms);
                ((e.time_ms, id), e)
            })
            .collect();
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

//! The table of answered request ids (idempotency keys).
//!
//! Two indexes of the same entries: by id, for the lookup on every apply, and by (time, id),
//! for forgetting the oldest first. Only the first is part of a snapshot: the second holds
//! nothing that the first does not, and it was a third of the snapshot of a write-heavy node
//! (the table is the largest part of the state under the bench's `put` workload). Loading a
//! snapshot rebuilds it. Both orders are canonical (ids and (time, id) pairs sorted), so a node
//! that applied the entries and a node that loaded a snapshot forget the same ids in the same
//! order.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Response;

/// The first answer to a request id, and when it was given (log time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Dedup {
    pub time_ms: u64,
    pub response: Response,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RequestIds {
    by_id: BTreeMap<String, Dedup>,
    by_time: BTreeSet<(u64, String)>,
}

impl RequestIds {
    pub fn get(&self, id: &str) -> Option<&Dedup> {
        self.by_id.get(id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Remember the first answer to `id` (which is not in the table).
    pub fn insert(&mut self, id: &str, time_ms: u64, response: Response) {
        self.by_id
            .insert(id.to_string(), Dedup { time_ms, response });
        self.by_time.insert((time_ms, id.to_string()));
    }

    /// Forget the ids answered `retention_ms` or longer before `now`, and then, while more
    /// than `keep` are left, the oldest.
    pub fn forget(&mut self, now: u64, retention_ms: u64, keep: usize) {
        while let Some((t, _)) = self.by_time.first() {
            if t + retention_ms > now && self.by_time.len() <= keep {
                break;
            }
            if let Some((_, id)) = self.by_time.pop_first() {
                self.by_id.remove(&id);
            }
        }
    }

    /// The time index, oldest first (for the invariant checks of tests).
    #[cfg(test)]
    pub fn by_time(&self) -> impl Iterator<Item = &(u64, String)> {
        self.by_time.iter()
    }

    #[cfg(test)]
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Dedup> {
        self.by_id.get_mut(id)
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
        &self.by_id[id]
    }
}

/// The snapshot form is the id map alone: `{"<id>": {"time_ms": .., "response": ..}}`, the
/// same as the `dedup` field of snapshots written before the time index was left out (their
/// `dedup_by_time` field is ignored on load).
impl Serialize for RequestIds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.by_id.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RequestIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RequestIds, D::Error> {
        let by_id = BTreeMap::<String, Dedup>::deserialize(d)?;
        let by_time = by_id
            .iter()
            .map(|(id, e)| (e.time_ms, id.clone()))
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
        let order: Vec<_> = back.by_time().map(|(t, id)| (*t, id.as_str())).collect();
        assert_eq!(order, [(5, "b"), (5, "c"), (7, "a")]);
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

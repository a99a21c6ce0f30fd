//! An ordered map whose copies share memory until one of them writes: the big tables of the
//! state machine (the KV store, the request-id table) are held in these, so a snapshot can
//! take a point-in-time copy of the whole state in microseconds under the state lock and
//! encode it after letting go, while the apply task goes on writing.
//!
//! The map is a sorted run of chunks, each a `BTreeMap` behind an `Arc`, together covering
//! the keys in order: chunk `i` holds the keys from its first key up to the next chunk's first
//! key. Cloning the map clones the chunk pointers. A write goes through `Arc::make_mut` on the
//! one chunk that holds the key, which copies that chunk (at most [`2 * CHUNK`](CHUNK)
//! entries) only if a copy still shares it, so after a snapshot each chunk is copied at most
//! once, by the first write to it, and none while no copy is alive.
//!
//! Before this, a snapshot encoded the whole state under the lock: every node stopped applying
//! for 120-290 ms every 100 000 entries under write load (docs/benchmarks.md). Copying the
//! plain maps under the lock took as long as encoding them.
//!
//! The chunking is not part of the value: two maps are equal, print and serialize the same
//! when they hold the same entries, however their chunks fell (a node that loaded a snapshot
//! and one that applied the entries have different chunk boundaries).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries per chunk when a map is built from sorted entries; a chunk that reaches twice this
/// is split in two (chunks are not merged: one emptied by removals goes when it is empty). A
/// copy-on-write costs one chunk copy. Tests run with tiny chunks, so that every test of the
/// state machine goes through many chunks, splits and emptied chunks.
#[cfg(not(test))]
pub const CHUNK: usize = 512;
#[cfg(test)]
pub const CHUNK: usize = 4;

type Chunk<K, V> = Arc<BTreeMap<K, V>>;

#[derive(Clone)]
pub struct CowMap<K, V> {
    /// Non-empty chunks in key order.
    chunks: Vec<Chunk<K, V>>,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

fn first_key<K: Ord, V>(c: &BTreeMap<K, V>) -> &K {
    c.first_key_value().expect("chunks are never empty").0
}

impl<K: Ord + Clone, V: Clone> CowMap<K, V> {
    pub fn new() -> Self {
        CowMap::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `key` if any chunk does: the last one whose first key is not
    /// greater than `key`. `None` when `key` precedes every key (or the map is empty).
    fn locate<Q>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // Keys written in increasing order (log times) land in the last chunk: check it first.
        let last = self.chunks.last()?;
        if first_key(last).borrow() <= key {
            return Some(self.chunks.len() - 1);
        }
        self.chunks
            .partition_point(|c| first_key(c).borrow() <= key)
            .checked_sub(1)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.chunks[self.locate(key)?].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.holding(key).is_some()
    }

    /// The chunk that holds `key`, if the map does: a write through it is found to be needed
    /// before the chunk is copied.
    fn holding<Q>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.locate(key)
            .filter(|&i| self.chunks[i].contains_key(key))
    }

    /// A mutable reference to `key`'s value; copies its chunk first if a copy shares it.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.holding(key)?;
        Arc::make_mut(&mut self.chunks[i]).get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.chunks.is_empty() {
            self.chunks.push(Arc::new(BTreeMap::from([(key, value)])));
            self.len = 1;
            return None;
        }
        // A key before every other goes to the first chunk.
        let i = self.locate(&key).unwrap_or(0);
        let chunk = Arc::make_mut(&mut self.chunks[i]);
        let old = chunk.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        if chunk.len() >= 2 * CHUNK {
            let middle = chunk
                .keys()
                .nth(chunk.len() / 2)
                .cloned()
                .expect("in range");
            let upper = chunk.split_off(&middle);
            self.chunks.insert(i + 1, Arc::new(upper));
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.holding(key)?;
        let old = Arc::make_mut(&mut self.chunks[i]).remove(key);
        self.after_removal(i);
        old
    }

    /// One entry left chunk `i`; an emptied chunk goes.
    fn after_removal(&mut self, i: usize) {
        self.len -= 1;
        if self.chunks[i].is_empty() {
            self.chunks.remove(i);
        }
    }

    pub fn first_key_value(&self) -> Option<(&K, &V)> {
        self.chunks.first()?.first_key_value()
    }

    pub fn pop_first(&mut self) -> Option<(K, V)> {
        let first = self.chunks.first_mut()?;
        // Chunks are never empty: there is an entry.
        let entry = Arc::make_mut(first).pop_first()?;
        self.after_removal(0);
        Some(entry)
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            chunks: self.chunks.iter(),
            entries: None,
            left: self.len,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// The entries with keys in `range`, in order.
    pub fn range<'a, Q, R>(&'a self, range: R) -> impl Iterator<Item = (&'a K, &'a V)> + 'a
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized + 'a,
        R: RangeBounds<Q> + Clone + 'a,
    {
        // The bounds are checked as `BTreeMap::range` checks them, whatever the chunks.
        match (range.start_bound(), range.end_bound()) {
            (Bound::Excluded(s), Bound::Excluded(e)) if s == e => {
                panic!("range start and end are equal and excluded in CowMap")
            }
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e))
                if s > e =>
            {
                panic!("range start is greater than range end in CowMap")
            }
            _ => {}
        }
        let start = match range.start_bound() {
            Bound::Included(k) | Bound::Excluded(k) => self.locate(k).unwrap_or(0),
            Bound::Unbounded => 0,
        };
        let end = range.clone();
        self.chunks[start..]
            .iter()
            .take_while(move |c| match end.end_bound() {
                Bound::Included(e) => first_key(c).borrow() <= e,
                Bound::Excluded(e) => first_key(c).borrow() < e,
                Bound::Unbounded => true,
            })
            .flat_map(move |c| c.range(range.clone()))
    }

    /// Entries already in increasing key order, `CHUNK` to a chunk.
    fn from_sorted(entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut map = CowMap::new();
        let mut chunk = BTreeMap::new();
        for (k, v) in entries {
            chunk.insert(k, v);
            if chunk.len() == CHUNK {
                map.len += chunk.len();
                map.chunks.push(Arc::new(std::mem::take(&mut chunk)));
            }
        }
        if !chunk.is_empty() {
            map.len += chunk.len();
            map.chunks.push(Arc::new(chunk));
        }
        map
    }

    /// How many chunks the map is in (for tests of the sharing).
    #[cfg(test)]
    fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Whether chunk `i` is shared with a copy (for tests of the sharing).
    #[cfg(test)]
    fn shares_chunk_with(&self, other: &Self, i: usize) -> bool {
        Arc::ptr_eq(&self.chunks[i], &other.chunks[i])
    }
}

/// The entries in key order.
pub struct Iter<'a, K, V> {
    chunks: std::slice::Iter<'a, Chunk<K, V>>,
    entries: Option<std::collections::btree_map::Iter<'a, K, V>>,
    /// Entries not yet returned (serializers are told the map's length up front, as for a
    /// `BTreeMap`).
    left: usize,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    fn next(&mut self) -> Option<(&'a K, &'a V)> {
        loop {
            if let Some(e) = self.entries.as_mut().and_then(|e| e.next()) {
                self.left -= 1;
                return Some(e);
            }
            self.entries = Some(self.chunks.next()?.iter());
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<K, V> ExactSizeIterator for Iter<'_, K, V> {}

impl<'a, K: Ord + Clone, V: Clone> IntoIterator for &'a CowMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;
    fn into_iter(self) -> Iter<'a, K, V> {
        self.iter()
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for CowMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        CowMap::from_sorted(iter.into_iter().collect::<BTreeMap<K, V>>())
    }
}

impl<K: Ord + Clone, V: Clone, const N: usize> From<[(K, V); N]> for CowMap<K, V> {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for CowMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<K: Ord + Clone, V: Clone + Eq> Eq for CowMap<K, V> {}

impl<K: Ord + Clone + fmt::Debug, V: Clone + fmt::Debug> fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K, V, Q> std::ops::Index<&Q> for CowMap<K, V>
where
    K: Ord + Clone + Borrow<Q>,
    V: Clone,
    Q: Ord + ?Sized,
{
    type Output = V;
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("key in map")
    }
}

/// Serialized as the map of its entries, like a `BTreeMap`.
impl<K: Ord + Clone + Serialize, V: Clone + Serialize> Serialize for CowMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de, K, V> Deserialize<'de> for CowMap<K, V>
where
    K: Ord + Clone + Deserialize<'de>,
    V: Clone + Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for Entries<K, V>
        where
            K: Ord + Clone + Deserialize<'de>,
            V: Clone + Deserialize<'de>,
        {
            type Value = CowMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                // Through a BTreeMap: the input's order is not trusted, and a repeated key
                // keeps the last value, as a BTreeMap field did.
                let mut entries = BTreeMap::new();
                while let Some((k, v)) = a.next_entry()? {
                    entries.insert(k, v);
                }
                Ok(CowMap::from_sorted(entries))
            }
        }
        d.deserialize_map(Entries(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numbers(n: u32) -> CowMap<u32, u32> {
        (0..n).map(|i| (i * 2, i)).collect()
    }

    #[test]
    fn a_copy_shares_every_chunk_until_a_write_copies_the_one_it_touches() {
        let mut a = numbers(3 * CHUNK as u32);
        assert_eq!(a.chunk_count(), 3);
        let b = a.clone();
        assert!((0..3).all(|i| a.shares_chunk_with(&b, i)));
        a.insert(1, 100);
        assert!(!a.shares_chunk_with(&b, 0) && a.shares_chunk_with(&b, 1));
        assert_eq!(b.get(&1), None);
        assert_eq!(a.get(&1), Some(&100));
        // Removing a key that is not there copies nothing.
        assert_eq!(a.remove(&(2 * CHUNK as u32 + 1)), None);
        assert!(a.shares_chunk_with(&b, 1));
        *a.get_mut(&(2 * CHUNK as u32)).unwrap() = 7;
        assert!(!a.shares_chunk_with(&b, 1) && a.shares_chunk_with(&b, 2));
        assert_eq!(b[&(2 * CHUNK as u32)], CHUNK as u32);
        assert_eq!(a[&(2 * CHUNK as u32)], 7);
        // The copy still holds exactly what the map held when it was taken.
        assert_eq!(b, numbers(3 * CHUNK as u32));
    }

    #[test]
    fn increasing_keys_fill_the_last_chunk_and_split_it() {
        let mut m = CowMap::new();
        for i in 0..(5 * CHUNK) {
            m.insert(i, ());
        }
        assert_eq!(m.len(), 5 * CHUNK);
        assert!(
            m.chunk_count() >= 3 && m.chunk_count() <= 5,
            "{}",
            m.chunk_count()
        );
        assert!(m.keys().copied().eq(0..5 * CHUNK));
        while m.pop_first().is_some() {}
        assert!(m.is_empty() && m.chunk_count() == 0);
    }

    #[test]
    fn serializes_like_a_btree_map_and_loads_back_equal() {
        let m: CowMap<String, u32> = (0..1500).map(|i| (format!("k{i}"), i)).collect();
        let plain: BTreeMap<String, u32> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, serde_json::to_string(&plain).unwrap());
        // Length up front, as a BTreeMap gives it (bincode needs it).
        assert_eq!(m.iter().len(), 1500);
        assert_eq!(
            bincode::serialize(&m).unwrap(),
            bincode::serialize(&plain).unwrap()
        );
        let back: CowMap<String, u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(format!("{back:?}"), format!("{plain:?}"));
        let unsorted: CowMap<String, u32> = serde_json::from_str(r#"{"b":1,"a":2,"b":3}"#).unwrap();
        assert_eq!(
            unsorted,
            CowMap::from([("a".to_string(), 2), ("b".to_string(), 3)])
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u8),
        Remove(u16),
        Set(u16, u8),
        PopFirst,
        Copy,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u16>(), any::<u8>()).prop_map(|(k, v)| Op::Insert(k % 400, v)),
            3 => any::<u16>().prop_map(|k| Op::Remove(k % 400)),
            2 => (any::<u16>(), any::<u8>()).prop_map(|(k, v)| Op::Set(k % 400, v)),
            1 => Just(Op::PopFirst),
            1 => Just(Op::Copy),
        ]
    }

    type Copies = (CowMap<u16, u8>, BTreeMap<u16, u8>);

    proptest! {
        /// Against a BTreeMap: every operation answers the same, copies keep the contents
        /// they had when taken whatever the map does afterwards, and ranges agree.
        #[test]
        fn behaves_like_a_btree_map_and_copies_do_not_move(
            ops in prop::collection::vec(op(), 1..3000),
            lo in 0u16..400, hi in 0u16..400,
        ) {
            let mut m = CowMap::new();
            let mut model = BTreeMap::new();
            let mut copies: Vec<Copies> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        prop_assert_eq!(m.insert(k, v), model.insert(k, v));
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(m.remove(&k), model.remove(&k));
                    }
                    Op::Set(k, v) => {
                        let a = m.get_mut(&k).map(|x| { *x = v; });
                        let b = model.get_mut(&k).map(|x| { *x = v; });
                        prop_assert_eq!(a, b);
                    }
                    Op::PopFirst => {
                        prop_assert_eq!(m.pop_first(), model.pop_first());
                    }
                    Op::Copy => copies.push((m.clone(), model.clone())),
                }
                prop_assert_eq!(m.len(), model.len());
                prop_assert_eq!(m.first_key_value(), model.first_key_value());
            }
            prop_assert!(m.iter().eq(model.iter()));
            for k in [lo, hi, 0, 399] {
                prop_assert_eq!(m.get(&k), model.get(&k));
            }
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            prop_assert!(m.range(lo..hi).eq(model.range(lo..hi)));
            prop_assert!(m.range(lo..=hi).eq(model.range(lo..=hi)));
            prop_assert!(m.range((Bound::Excluded(lo), Bound::Unbounded))
                .eq(model.range((Bound::Excluded(lo), Bound::Unbounded))));
            prop_assert!(m.range(..hi).eq(model.range(..hi)));
            for (copy, then) in &copies {
                prop_assert!(copy.iter().eq(then.iter()));
                prop_assert_eq!(copy.len(), then.len());
            }
            // Chunks stay non-empty, ordered and bounded.
            for w in m.chunks.windows(2) {
                prop_assert!(w[0].last_key_value().unwrap().0 < first_key(&w[1]));
            }
            prop_assert!(m.chunks.iter().all(|c| !c.is_empty() && c.len() < 2 * CHUNK));
        }
    }
}

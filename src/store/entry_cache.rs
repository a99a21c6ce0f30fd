//! The newest log entries, kept decoded in memory.
//!
//! Every entry is read back right after it is appended: by the state machine worker to apply
//! it, and on the leader by each replication stream to send it. From RocksDB each of those reads
//! is a lookup and a JSON decode (five decodes per entry across a three-node cluster); from this
//! cache it is a clone.
//!
//! Invariant: the cache holds a contiguous run of entries that ends at the last entry of the
//! log (or nothing). It mirrors every change the log store makes (append, truncate, purge), so
//! any range that starts at or after its first index is answered exactly as RocksDB would;
//! a range that starts before it is read from RocksDB.

use std::collections::VecDeque;

use openraft::entry::RaftEntry;

use crate::types::Entry;

/// At most this many entries are kept ...
const MAX_ENTRIES: usize = 4096;
/// ... and at most about this many bytes (their encoded size).
const MAX_BYTES: usize = 8 << 20;

#[derive(Default)]
pub(super) struct EntryCache {
    /// Entries with their encoded size, in index order, without gaps.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index())
    }

    /// Record an entry just written to the log; `size` is its encoded length.
    pub(super) fn append(&mut self, entry: Entry, size: usize) {
        let index = entry.index();
        match self.last_index() {
            // Overwrites what follows: the log store's write replaced those entries too.
            Some(last) if index <= last => self.truncate_from(index),
            // A gap (the log restarts after a snapshot): what is cached no longer ends at the
            // last entry.
            Some(last) if index > last + 1 => self.clear(),
            _ => {}
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > MAX_ENTRIES || (self.bytes > MAX_BYTES && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    /// Forget entries with index `from` and above (the log deleted them).
    pub(super) fn truncate_from(&mut self, from: u64) {
        while self.last_index().is_some_and(|i| i >= from) {
            let (_, size) = self.entries.pop_back().expect("non-empty");
            self.bytes -= size;
        }
    }

    /// Forget entries with index `upto` and below (the log purged them).
    pub(super) fn purge_upto(&mut self, upto: u64) {
        while self.first_index().is_some_and(|i| i <= upto) {
            self.pop_front();
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// The entries with index in `start..end` (`end` None: to the end of the log), or None when
    /// the range starts before the cached run and must be read from the log store.
    pub(super) fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = (start - first) as usize;
        let take = match end {
            Some(end) => end.saturating_sub(start) as usize,
            None => usize::MAX,
        };
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TypeConfig;

    fn entry(term: u64, index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(term, 1, index)
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| {
            v.iter()
                .map(|e| (e.log_id().leader_id.term, e.index()))
                .collect()
        })
    }

    #[test]
    fn serves_ranges_inside_the_run_and_refuses_ranges_before_it() {
        let mut c = EntryCache::default();
        assert_eq!(indexes(c.get(1, None)), None, "empty cache answers nothing");
        for i in 5..=9 {
            c.append(entry(1, i), 10);
        }
        assert_eq!(indexes(c.get(4, Some(6))), None);
        assert_eq!(indexes(c.get(5, Some(7))), Some(vec![(1, 5), (1, 6)]));
        assert_eq!(indexes(c.get(8, None)), Some(vec![(1, 8), (1, 9)]));
        // Past the end of the log: nothing, as the log store would answer.
        assert_eq!(indexes(c.get(10, Some(20))), Some(vec![]));
        assert_eq!(indexes(c.get(7, Some(7))), Some(vec![]));
        assert_eq!(c.bytes, 50);
    }

    #[test]
    fn mirrors_truncate_overwrite_purge_and_gaps() {
        let mut c = EntryCache::default();
        for i in 1..=6 {
            c.append(entry(1, i), 10);
        }
        c.truncate_from(5);
        assert_eq!(indexes(c.get(3, None)), Some(vec![(1, 3), (1, 4)]));
        // An append below the end replaces the entries from there on.
        c.append(entry(2, 3), 10);
        assert_eq!(indexes(c.get(1, None)), Some(vec![(1, 1), (1, 2), (2, 3)]));
        c.purge_upto(1);
        assert_eq!(indexes(c.get(1, None)), None);
        assert_eq!(indexes(c.get(2, None)), Some(vec![(1, 2), (2, 3)]));
        // A gap: the old run is dropped, the new one starts at the appended entry.
        c.append(entry(2, 10), 10);
        assert_eq!(indexes(c.get(3, None)), None);
        assert_eq!(indexes(c.get(10, None)), Some(vec![(2, 10)]));
        c.purge_upto(20);
        assert_eq!(indexes(c.get(10, None)), None);
        assert_eq!(c.bytes, 0);
    }

    #[test]
    fn evicts_the_oldest_beyond_the_bounds() {
        let mut c = EntryCache::default();
        for i in 1..=(MAX_ENTRIES as u64 + 3) {
            c.append(entry(1, i), 1);
        }
        assert_eq!(c.entries.len(), MAX_ENTRIES);
        assert_eq!(c.first_index(), Some(4));
        assert_eq!(indexes(c.get(3, None)), None);
        // One entry over the byte bound is kept alone; the next push evicts it.
        c.append(entry(1, MAX_ENTRIES as u64 + 4), MAX_BYTES + 1);
        assert_eq!(c.first_index(), Some(MAX_ENTRIES as u64 + 4));
        c.append(entry(1, MAX_ENTRIES as u64 + 5), 1);
        assert_eq!(c.first_index(), Some(MAX_ENTRIES as u64 + 5));
        assert_eq!(c.bytes, 1);
    }
}

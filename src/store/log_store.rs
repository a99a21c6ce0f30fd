//! The Raft log and vote on RocksDB, with group-committed fsyncs.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rocksdb::{ColumnFamily, Direction, IteratorMode, WriteBatch, DB};
use serde::{de::DeserializeOwned, Serialize};

use super::entry_cache::EntryCache;
use super::{invalid_data, io_err, CF_LOGS, CF_META};
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// Counters for group commit: how many appends each fsync covered.
#[derive(Debug, Default)]
pub struct FsyncStats {
    pub fsyncs: AtomicU64,
    pub appends: AtomicU64,
    pub entries: AtomicU64,
}

#[derive(Clone)]
pub struct LogStore {
    /// Before `db`: dropped first, so the last clone's drop can still write it.
    committed: Arc<PendingCommitted>,
    db: Arc<DB>,
    flusher: mpsc::Sender<IOFlushed<TypeConfig>>,
    pub stats: Arc<FsyncStats>,
    /// The newest entries, decoded; shared by the store and every reader cloned from it.
    cache: Arc<Mutex<EntryCache>>,
}

impl LogStore {
    pub(super) fn new(db: Arc<DB>) -> LogStore {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let stats = Arc::new(FsyncStats::default());
        // A weak handle: the thread must not be what keeps RocksDB open. Otherwise the last
        // reference could be dropped here, closing the DB concurrently with process exit
        // (RocksDB then aborts with "pthread lock: Invalid argument").
        let flush_db = Arc::downgrade(&db);
        let flush_stats = stats.clone();
        // One fsync covers every append whose batch was written before it started.
        std::thread::Builder::new()
            .name("concord-wal-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let res = match flush_db.upgrade() {
                        Some(db) => db.flush_wal(true).map_err(io_err),
                        None => Err(io_err("the store is closed")),
                    };
                    flush_stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                    flush_stats
                        .appends
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for cb in batch {
                        cb.io_completed(res.as_ref().map(|_| ()).map_err(io_err));
                    }
                }
            })
            .expect("spawn fsync thread");
        LogStore {
            committed: Arc::new(PendingCommitted {
                db: Arc::downgrade(&db),
                id: Mutex::new(None),
            }),
            db,
            flusher: tx,
            stats,
            cache: Arc::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        // The cache is only ever left consistent (no panics inside its methods' critical
        // sections), so a poisoned lock still holds a valid value.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cf_meta(&self) -> &ColumnFamily {
        self.db.cf_handle(CF_META).expect("meta column family")
    }

    fn cf_logs(&self) -> &ColumnFamily {
        self.db.cf_handle(CF_LOGS).expect("logs column family")
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        match self.db.get_cf(self.cf_meta(), key).map_err(io_err)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(invalid_data),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> io::Result<()> {
        let b = serde_json::to_vec(value).map_err(invalid_data)?;
        self.db.put_cf(self.cf_meta(), key, b).map_err(io_err)
    }
}

const COMMITTED: &str = "committed";

/// The committed log id openraft saved last and that is not yet in RocksDB's WAL buffer.
///
/// Openraft saves the committed id every time it advances, a RocksDB write of its own on the
/// Raft core's path (1.7 % of the nodes' CPU under `put`, docs/benchmarks.md). That write
/// only ever reached the WAL buffer: it became durable with the next append's fsync. So it is
/// kept here and written in the next append's batch instead (or with a vote, a purge, or when
/// the store is dropped). What is durable is the same as before: after a crash a node
/// restarts from a committed id one fsync older at most, and catches up from the leader.
struct PendingCommitted {
    db: std::sync::Weak<DB>,
    id: Mutex<Option<LogId>>,
}

impl PendingCommitted {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LogId>> {
        self.id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Move the pending id, if any, into `batch`.
    fn take_into(&self, db: &DB, batch: &mut WriteBatch) -> io::Result<()> {
        let Some(c) = self.lock().take() else {
            return Ok(());
        };
        let cf = db
            .cf_handle(CF_META)
            .ok_or_else(|| io_err("no meta column family"))?;
        let v = serde_json::to_vec(&Some(c)).map_err(invalid_data)?;
        batch.put_cf(cf, COMMITTED, v);
        Ok(())
    }

    /// Write the pending id, if any, on its own (with a vote or a purge, which sync).
    fn write(&self, db: &DB) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        self.take_into(db, &mut batch)?;
        match batch.is_empty() {
            true => Ok(()),
            false => db.write(batch).map_err(io_err),
        }
    }
}

impl Drop for PendingCommitted {
    /// A clean shutdown drops the store before it closes RocksDB, which writes the WAL
    /// buffer out: the last committed id survives it.
    fn drop(&mut self) {
        if let Some(db) = self.db.upgrade() {
            let _ = self.write(&db);
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> io::Result<u64> {
    let b: [u8; 8] = key.try_into().map_err(invalid_data)?;
    Ok(u64::from_be_bytes(b))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(*x + 1),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(hit) = self.cache().get(start, end) {
            return Ok(hit);
        }
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf_logs(),
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(io_err)?;
            let index = key_index(&k)?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = serde_json::from_slice(&v).map_err(invalid_data)?;
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta("vote")
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.get_meta("last_purged")?;
        let last = match self
            .db
            .iterator_cf(self.cf_logs(), IteratorMode::End)
            .next()
        {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(io_err)?;
                let e: Entry = serde_json::from_slice(&v).map_err(invalid_data)?;
                Some(e.log_id())
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.committed.write(&self.db)?;
        self.put_meta("vote", vote)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush_wal(true).map_err(io_err))
            .await
            .map_err(io_err)?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Written with the next append (see `PendingCommitted`). The committed id only grows;
        // `None` never follows `Some`.
        if let Some(c) = committed {
            *self.committed.lock() = Some(c);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        if let Some(c) = *self.committed.lock() {
            return Ok(Some(c));
        }
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for entry in entries {
            let v = serde_json::to_vec(&entry).map_err(invalid_data)?;
            batch.put_cf(self.cf_logs(), index_key(entry.index()), &v);
            written.push((entry, v.len()));
        }
        self.committed.take_into(&self.db, &mut batch)?;
        let n = written.len() as u64;
        // Written (readable) now; acknowledged once the flusher's fsync covers it.
        if let Err(e) = self.db.write(batch) {
            // What the cache holds must match the log; the log is now unknown.
            self.cache().clear();
            return Err(io_err(e));
        }
        let mut cache = self.cache();
        for (entry, size) in written {
            cache.append(entry, size);
        }
        drop(cache);
        self.stats.entries.fetch_add(n, Ordering::Relaxed);
        self.flusher
            .send(callback)
            .map_err(|_| io_err("fsync thread stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        // First: a reader must not find in memory what is no longer in the log.
        self.cache().truncate_from(from);
        let res = self
            .db
            .delete_range_cf(self.cf_logs(), index_key(from), index_key(u64::MAX))
            // Delete the last key too: the range end is exclusive.
            .and_then(|()| self.db.delete_cf(self.cf_logs(), index_key(u64::MAX)))
            .map_err(io_err);
        if res.is_err() {
            // Part of the range may still be there: read the log itself from now on.
            self.cache().clear();
        }
        res
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: a restart between the two steps must not see a gap.
        self.committed.write(&self.db)?;
        self.put_meta("last_purged", &log_id)?;
        self.cache().purge_upto(log_id.index());
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush_wal(true).map_err(io_err))
            .await
            .map_err(io_err)??;
        self.db
            .delete_range_cf(self.cf_logs(), index_key(0), index_key(log_id.index() + 1))
            .map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::EntryPayload;

    use super::*;
    use crate::sm::{Command, LogEntry};

    /// A `put` entry as the log stores it (JSON) and as it travels between nodes (bincode).
    /// The stored form is pinned: logs written by earlier versions must still replay
    /// (DESIGN rule 8), whatever the in-memory type (the shared `Arc` entry included).
    #[test]
    fn a_stored_entry_keeps_its_encoding() {
        let stored = r#"{"log_id":{"leader_id":{"term":2,"node_id":1},"index":7},"payload":{"Normal":{"time_ms":1000,"request_id":"r-1","cmd":{"KvPut":{"key":"k","value":"v\"1","lease_id":null,"if_version":3,"if_absent":false,"fence":null}}}}}"#;
        let entry: Entry = serde_json::from_str(stored).unwrap();
        let EntryPayload::Normal(e) = &entry.payload else {
            panic!("not a normal entry: {entry:?}");
        };
        let want = LogEntry {
            time_ms: 1000,
            request_id: Some("r-1".into()),
            cmd: Command::KvPut {
                key: "k".into(),
                value: "v\"1".into(),
                lease_id: None,
                if_version: Some(3),
                if_absent: false,
                fence: None,
            },
        };
        assert_eq!(**e, want);
        assert_eq!(entry.log_id.index, 7);
        assert_eq!(serde_json::to_string(&entry).unwrap(), stored);
        // On the wire: the entry's fields in order, nothing for the `Arc`.
        let wire = bincode::serialize(&entry).unwrap();
        let plain = bincode::serialize(&(2u64, 1u64, 7u64, 1u32, &want)).unwrap();
        assert_eq!(wire, plain);
        let back: Entry = bincode::deserialize(&wire).unwrap();
        assert_eq!(back.payload, EntryPayload::Normal(Arc::new(want)));
    }
}

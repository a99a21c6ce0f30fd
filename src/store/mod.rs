//! Storage for openraft on RocksDB.
//!
//! Key layout (one RocksDB instance per node, column families):
//! - `meta`: `vote` (JSON, fsynced before `save_vote` returns), `last_purged` (JSON, written
//!   before logs are deleted), `committed` (JSON; written with the next append, vote or purge,
//!   or on close, not on each advance).
//! - `logs`: big-endian u64 index -> JSON-encoded `Entry`. Appends are one `WriteBatch`,
//!   readable when `append` returns and acknowledged only after a WAL fsync; a single flusher
//!   thread writes the WAL buffer (`manual_wal_flush`) and fsyncs once for every append that
//!   arrived meanwhile (group commit). The newest entries are also kept decoded in memory
//!   (`entry_cache`), so that applying and replicating what was just appended does not read it
//!   back from RocksDB and decode it again.
//! - `snapshot`: where versions before the snapshot file kept the snapshot (`meta` and `data`,
//!   JSON). Read on start if it is newer than the file (or there is no file yet); deleted when
//!   a newer snapshot file is written.
//!
//! The snapshot itself is a file in the data directory, `snapshot` (next to `rocksdb/`): a
//! header line, the `SnapshotMeta` as JSON on one line, a line with the state's length and the
//! SHA-256 of the meta line and the state, then the `SmState` as JSON (files of the first
//! version, without that line, are still read). It is
//! written to `snapshot.tmp`, synced, renamed over the old one and the directory synced, so a
//! crash leaves one or the other whole. On start the state machine is loaded from it and
//! openraft replays the committed log after it.
//!
//! The on-disk format is JSON so that `#[serde(default)]` fields keep old logs readable.

mod entry_cache;
mod log_store;
mod state_machine;

use std::io;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

pub mod watch;

pub use log_store::{FsyncStats, LogStore};
pub use state_machine::{SmShared, SmState, StateMachineStore, Wakeup};

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LOGS: &str = "logs";
pub(crate) const CF_SNAPSHOT: &str = "snapshot";

/// Bytes of RocksDB memtables across all column families.
const MEMTABLE_BUDGET: usize = 32 << 20;

/// Bytes of write-ahead log files kept, at most, before RocksDB flushes whatever column family
/// still holds the oldest one: three of the log family's memtables.
pub const MAX_WAL_BYTES: u64 = 3 * (MEMTABLE_BUDGET as u64 / 2);

/// Open (or create) the node's RocksDB and return both halves of the openraft storage.
pub fn open(dir: &Path) -> io::Result<(LogStore, StateMachineStore)> {
    std::fs::create_dir_all(dir)?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Memtables are memory the node holds until RocksDB flushes them. The defaults (64 MiB per
    // column family, two per family) let the log (and the snapshot, when it was a value here)
    // hold over 100 MiB between flushes; cap all memtables together instead.
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
    // Writes go to RocksDB's WAL buffer in memory, not to the file: the fsync thread's
    // `flush_wal(true)` writes the buffer and syncs it, once for every append that arrived
    // meanwhile (so do `save_vote` and `purge`). Without this, each append was a `write` system
    // call of its own (docs/benchmarks.md). Nothing is acknowledged before that sync, and a
    // clean close writes the buffer out; a crash loses only what was never acknowledged.
    opts.set_manual_wal_flush(true);
    // A WAL file is deleted once every column family written in it has been flushed. An
    // append's batch also writes the meta family whenever the commit advanced since the last
    // one (the committed log id, `log_store.rs`: nearly every batch under load), and that
    // memtable hardly grows, so it was never flushed on its own: WAL files piled up towards
    // RocksDB's default bound (four times every family's write buffers, about 776 MiB here with
    // the default family's 64 MiB ones), and a restart reads them all back
    // (docs/benchmarks.md). Past this bound RocksDB flushes the meta family (a few bytes) and
    // the old files go.
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    let cfs = [CF_META, CF_LOGS, CF_SNAPSHOT].into_iter().map(|n| {
        let mut cf = Options::default();
        cf.set_write_buffer_size(match n {
            // Only deletions of an earlier version's snapshot are written here now.
            CF_SNAPSHOT => 1 << 20,
            _ => MEMTABLE_BUDGET / 2,
        });
        ColumnFamilyDescriptor::new(n, cf)
    });
    let db = DB::open_cf_descriptors(&opts, dir.join("rocksdb"), cfs).map_err(io_err)?;
    let db = Arc::new(db);
    let sm = StateMachineStore::open(db.clone(), dir)?;
    Ok((LogStore::new(db), sm))
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

//! openraft's own storage test suite against the RocksDB store.

use concord::store::{self, LogStore, StateMachineStore};
use concord::types::TypeConfig;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        Suite::test_all(Builder).await.expect("storage suite");
    });
}

/// Append `entry` and wait until it is acknowledged (fsynced).
async fn append_acked(log: &mut LogStore, entry: concord::types::Entry) {
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;

    let (tx, rx) = TypeConfig::oneshot();
    log.append([entry], IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

/// Append a blank entry at `index` (term 1) and wait until it is acknowledged.
async fn append_blank(log: &mut LogStore, index: u64) {
    append_acked(log, openraft::testing::blank_ent::<TypeConfig>(1, 1, index)).await;
}

fn log_id(index: u64) -> concord::types::LogId {
    openraft::testing::log_id::<TypeConfig>(1, 1, index)
}

/// Open a copy of the store's files as they are on disk now: what a crash would leave.
fn open_crashed_copy(dir: &TempDir) -> (TempDir, LogStore, StateMachineStore) {
    let crashed = TempDir::new().unwrap();
    copy_dir(dir.path(), crashed.path());
    let (log, sm) = store::open(crashed.path()).unwrap();
    (crashed, log, sm)
}

/// Copy a directory tree as it is on disk now.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Appends are written to RocksDB's WAL buffer in memory (`manual_wal_flush`); the fsync
/// thread must write that buffer to the file before it acknowledges. A copy of the files taken
/// while the store is still open (what a crash leaves, no clean close) holds every acknowledged
/// entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_append_is_in_the_files_without_a_clean_close() {
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    for index in 1..=5u64 {
        append_blank(&mut log, index).await;
    }
    let (_crashed, mut reopened, _sm2) = open_crashed_copy(&dir);
    let entries = reopened
        .get_log_reader()
        .await
        .try_get_log_entries(1..6)
        .await
        .unwrap();
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, [1, 2, 3, 4, 5]);
    drop(log);
}

/// The committed id is written with the next append's batch, not on its own (a write per
/// commit advance): once that append is acknowledged, a crash (a copy of the open store's
/// files) keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_committed_id_is_durable_with_the_next_acknowledged_append() {
    use openraft::storage::RaftLogStorage;

    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    for index in 1..=3 {
        append_blank(&mut log, index).await;
    }
    log.save_committed(Some(log_id(2))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2)));
    append_blank(&mut log, 4).await;
    let (_crashed, mut reopened, _sm2) = open_crashed_copy(&dir);
    assert_eq!(reopened.read_committed().await.unwrap(), Some(log_id(2)));
    drop(log);
}

/// A committed id saved after the last append is still written on a clean shutdown, whichever
/// of the two stores closes RocksDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_committed_id_survives_a_clean_close() {
    use openraft::storage::RaftLogStorage;

    let dir = TempDir::new().unwrap();
    let (mut log, sm) = store::open(dir.path()).unwrap();
    for index in 1..=3 {
        append_blank(&mut log, index).await;
    }
    log.save_committed(Some(log_id(3))).await.unwrap();
    drop(log); // the state machine store closes RocksDB
    drop(sm);
    let (mut log, sm) = store::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3)));
    append_blank(&mut log, 4).await;
    log.save_committed(Some(log_id(4))).await.unwrap();
    drop(sm); // the log store closes RocksDB
    drop(log);
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(4)));
}

/// Nearly every append's batch also writes the meta column family (the committed id), which is
/// never flushed on its own; without a bound, RocksDB kept every WAL file up to its default
/// total (about 776 MiB here), and a restart read them all. The store bounds the WAL files to
/// `MAX_WAL_BYTES` (the file being written aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_files_stay_bounded_while_the_log_grows() {
    use std::sync::Arc;

    use concord::sm::{Command, LogEntry};
    use openraft::storage::RaftLogStorage;

    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    let value = "v".repeat(256 << 10);
    // 120 MB of entries, under RocksDB's default bound, over twice the store's.
    for index in 1..=480u64 {
        let cmd = Command::KvPut {
            key: format!("k{index}"),
            value: value.clone(),
            lease_id: None,
            if_version: None,
            if_absent: false,
            fence: None,
        };
        let entry = LogEntry {
            time_ms: index,
            request_id: None,
            cmd,
        };
        let entry = concord::types::Entry {
            log_id: log_id(index),
            payload: openraft::EntryPayload::Normal(Arc::new(entry)),
        };
        append_acked(&mut log, entry).await;
        log.save_committed(Some(log_id(index))).await.unwrap();
    }
    let wal_bytes = || -> u64 {
        std::fs::read_dir(dir.path().join("rocksdb"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            // A file deleted in the background since the listing counts for nothing.
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    // Obsolete files are deleted after the flush that frees them, in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let limit = store::MAX_WAL_BYTES + (32 << 20);
    while wal_bytes() > limit && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let held = wal_bytes();
    assert!(held <= limit, "{held} bytes of WAL files, bound {limit}");
}

//! The openraft state-machine adaptor: decodes entries, applies them to the pure [`Sm`],
//! answers the waiting client, and persists snapshots.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::alias::SnapshotOf;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use rocksdb::{ColumnFamily, ReadOptions, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use super::watch::{WatchLog, DEFAULT_WATCH_HISTORY};
use super::{invalid_data, io_err, CF_SNAPSHOT};
use crate::sm::Sm;
use crate::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};

/// Everything a snapshot holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub sm: Sm,
}

/// The state shared between the Raft apply task and the API's readers.
pub struct SmShared {
    state: RwLock<SmState>,
    /// Last applied index; waiters (blocking acquires, watches) wake on every change.
    applied: watch::Sender<u64>,
    /// Change events of the applied entries, for `/v1/watch`.
    history: Mutex<WatchLog>,
    /// Per lease, the wake-up of the calls blocked on one of its waits (lock and semaphore
    /// acquires); see [`SmShared::subscribe_lease`].
    lease_wakers: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// Calls waiting until a given index is applied ([`SmShared::wait_applied`]), by index.
    index_waiters: Mutex<BTreeMap<u64, Vec<oneshot::Sender<()>>>>,
    /// Size of the last snapshot built: the next one's buffer starts this large, so encoding
    /// does not also copy the buffer over while it grows.
    snapshot_bytes: AtomicUsize,
    /// The log index the stored snapshot covers (`None`: none stored, or one of no entries),
    /// known from the snapshot loaded on open and kept with every snapshot stored, not read
    /// back from the file. Held while a snapshot is stored: a build (its own task in openraft)
    /// and an install from the leader can overlap, and the older must not replace the newer.
    stored_snapshot: Mutex<Option<u64>>,
}

impl SmShared {
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Resolves once the entry at `index` is applied here; `false` if this state machine went
    /// away first. Each waiter is woken once, by the apply that reaches its index (a follower
    /// that forwarded a write waits here for its own entry; waking all of them on every apply
    /// would cost hundreds of wake-ups per entry under load).
    pub fn wait_applied(&self, index: u64) -> impl std::future::Future<Output = bool> {
        let rx = {
            let mut waiters = self.index_waiters();
            // Checked under the waiters' lock, which the applier takes after moving the
            // index: a waiter is either satisfied here or registered before the wake.
            if *self.applied.borrow() >= index {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                waiters.entry(index).or_default().push(tx);
                Some(rx)
            }
        };
        async move {
            match rx {
                None => true,
                Some(rx) => rx.await.is_ok(),
            }
        }
    }

    fn index_waiters(&self) -> MutexGuard<'_, BTreeMap<u64, Vec<oneshot::Sender<()>>>> {
        self.index_waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move the applied index to `index` and wake the waiters it satisfies.
    fn set_applied(&self, index: u64) {
        self.applied.send_replace(index);
        let done = {
            let mut waiters = self.index_waiters();
            let later = waiters.split_off(&(index + 1));
            std::mem::replace(&mut *waiters, later)
        };
        for tx in done.into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// A wake-up for a call blocked on a wait of `lease_id`: it fires after an applied entry
    /// changed something of that lease (an event naming it: a grant, the end of its wait,
    /// the end of the lease) or a deadlock was resolved, not on every applied entry. With
    /// hundreds of blocked acquires, waking each of them on every entry to look for its own
    /// grant was most of the leader's work under `lock-contended` (docs/benchmarks.md).
    /// Take it before proposing the acquire, so no change is missed.
    pub fn subscribe_lease(self: &Arc<Self>, lease_id: u64) -> Wakeup {
        let mut wakers = self.wakers();
        let rx = wakers
            .entry(lease_id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Wakeup {
            rx,
            lease: Some((self.clone(), lease_id)),
        }
    }

    fn wakers(&self) -> MutexGuard<'_, HashMap<u64, watch::Sender<u64>>> {
        self.lease_wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the calls waiting on `leases` (all of them when `all`).
    fn wake_leases(&self, leases: &[u64], all: bool) {
        let wakers = self.wakers();
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n += 1);
        if all {
            wakers.values().for_each(bump);
        } else {
            leases.iter().filter_map(|l| wakers.get(l)).for_each(bump);
        }
    }

    pub fn history(&self) -> MutexGuard<'_, WatchLog> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replace(&self, st: SmState) {
        let index = st.last_applied.as_ref().map_or(0, |l| l.index());
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        *state = st;
        self.history().reset(index);
        drop(state);
        self.set_applied(index);
        self.wake_leases(&[], true);
    }
}

/// What a blocked call waits on to look at the state again: every applied entry
/// ([`SmShared::subscribe`]) or the changes of one lease ([`SmShared::subscribe_lease`]).
pub struct Wakeup {
    rx: watch::Receiver<u64>,
    lease: Option<(Arc<SmShared>, u64)>,
}

impl Wakeup {
    /// Resolves at the next wake-up; `false` when the node is shutting down.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

impl From<watch::Receiver<u64>> for Wakeup {
    fn from(rx: watch::Receiver<u64>) -> Wakeup {
        Wakeup { rx, lease: None }
    }
}

impl Drop for Wakeup {
    fn drop(&mut self) {
        if let Some((shared, lease_id)) = self.lease.take() {
            let mut wakers = shared.wakers();
            // Subscribing and dropping both hold the lock, so the count is exact: 1 is ours.
            if wakers
                .get(&lease_id)
                .is_some_and(|tx| tx.receiver_count() == 1)
            {
                wakers.remove(&lease_id);
            }
        }
    }
}

/// The leases an entry's events name (`lease_id` in the detail, which every event of a
/// lease, of a lock or semaphore grant, and of the end of a lock or semaphore wait carries:
/// `wait_expired`, `wait_cancelled`); `true` when a deadlock was resolved, which can cancel
/// any wait. A change to a wait that emitted no such event would leave the blocked call
/// asleep until its slack ran out (tests/api.rs checks the expiry of both kinds of wait).
fn touched_leases(events: &[crate::sm::Event], out: &mut Vec<u64>) -> bool {
    let mut all = false;
    for e in events {
        all |= e.kind == "deadlock";
        if let Some(id) = e.detail.get("lease_id").and_then(|v| v.as_u64()) {
            out.push(id);
        }
    }
    all
}

#[derive(Clone)]
pub struct StateMachineStore {
    pub shared: Arc<SmShared>,
    db: Arc<DB>,
    /// The node's data directory: the snapshot file lives here, next to `rocksdb/`.
    dir: Arc<Path>,
}

/// The snapshot file, in the data directory: [`SNAPSHOT_HEADER`], the [`SnapshotMeta`] as
/// JSON on one line, a line with the state's length in bytes and the SHA-256 of the meta line
/// and the state (lowercase hex), then the state ([`SmState`]) as JSON to the end.
const SNAPSHOT_FILE: &str = "snapshot";
/// Where the next snapshot file is written before it is renamed over the current one.
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const SNAPSHOT_HEADER: &[u8] = b"concord snapshot 2\n";
/// The first version's header (c165657): no length and checksum line. Read, never written.
const SNAPSHOT_HEADER_V1: &[u8] = b"concord snapshot 1\n";

impl StateMachineStore {
    pub(super) fn open(db: Arc<DB>, dir: &Path) -> io::Result<StateMachineStore> {
        let (tx, _) = watch::channel(0);
        let store = StateMachineStore {
            shared: Arc::new(SmShared {
                state: RwLock::new(SmState::default()),
                applied: tx,
                history: Mutex::new(WatchLog::new(DEFAULT_WATCH_HISTORY)),
                lease_wakers: Mutex::new(HashMap::new()),
                index_waiters: Mutex::new(BTreeMap::new()),
                snapshot_bytes: AtomicUsize::new(0),
                stored_snapshot: Mutex::new(None),
            }),
            db,
            dir: Arc::from(dir),
        };
        if let Some((meta, data)) = store.load_snapshot()? {
            let st: SmState = serde_json::from_slice(&data).map_err(invalid_data)?;
            store.shared.replace(st);
            *store.stored_snapshot() = index(&meta);
        }
        Ok(store)
    }

    /// The newest stored snapshot: the file, or one that an earlier version kept in RocksDB's
    /// snapshot column family, whichever covers more of the log.
    fn load_snapshot(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let file = read_snapshot_file(&self.dir.join(SNAPSHOT_FILE))?;
        let legacy = self.load_legacy_snapshot()?;
        Ok(match (file, legacy) {
            (Some(f), Some(l)) if index(&l.0) > index(&f.0) => Some(l),
            (Some(f), _) => Some(f),
            (None, l) => l,
        })
    }

    fn stored_snapshot(&self) -> MutexGuard<'_, Option<u64>> {
        let lock = &self.shared.stored_snapshot;
        lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf_snapshot(&self) -> &ColumnFamily {
        self.db
            .cf_handle(CF_SNAPSHOT)
            .expect("snapshot column family")
    }

    /// A snapshot stored by a version before the snapshot file (both keys of the `snapshot`
    /// column family, written together).
    fn load_legacy_snapshot(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let cf = self.cf_snapshot();
        // Both keys from one point in time: a snapshot being stored meanwhile is all or nothing.
        let view = self.db.snapshot();
        let meta = view.get_cf(cf, "meta").map_err(io_err)?;
        // Not through RocksDB's block cache: the value is the whole state (tens of MB) in one
        // block, read on start and to send it; cached, it stayed in memory for nothing.
        let mut once = ReadOptions::default();
        once.fill_cache(false);
        let data = view.get_cf_opt(cf, "data", once).map_err(io_err)?;
        match (meta, data) {
            (Some(m), Some(d)) => {
                let meta = serde_json::from_slice(&m).map_err(invalid_data)?;
                Ok(Some((meta, d)))
            }
            _ => Ok(None),
        }
    }

    /// Whether an earlier version's snapshot is still in RocksDB (its meta key, without
    /// reading or decoding it).
    fn has_legacy_snapshot(&self) -> io::Result<bool> {
        let meta = self.db.get_pinned_cf(self.cf_snapshot(), "meta");
        Ok(meta.map_err(io_err)?.is_some())
    }

    /// Store a snapshot unless a newer one is stored already (`false` then).
    ///
    /// A file of its own, written beside and then renamed over the current one, both synced:
    /// a crash leaves the old snapshot or the new one, whole, and openraft purges the log a
    /// snapshot covers only after this returns. It used to be a value in RocksDB (written
    /// outside the write-ahead log, then flushed to a table file): every snapshot, 24 MB under
    /// put load, was copied into a memtable, written out as a table file with a checksum over
    /// it, and copied again by the compactions that dropped the old ones, on every node every
    /// 100 000 entries (docs/benchmarks.md).
    ///
    /// Which snapshot is newer is decided by the index kept in memory, not by reading the
    /// stored file's meta again: a file damaged since it was written (its meta showing a higher
    /// index, say) must not keep every later snapshot out.
    fn save_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<bool> {
        let mut stored = self.stored_snapshot();
        if *stored > index(meta) {
            return Ok(false);
        }
        let legacy = self.has_legacy_snapshot()?;
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let written = write_synced(&tmp, meta, data);
        if written.is_err() {
            // Disk full, say: do not leave up to a whole state behind until the next try.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE))?;
        *stored = index(meta);
        File::open(&self.dir)?.sync_all()?;
        // A snapshot an earlier version left in RocksDB is older than this one now: let it go,
        // table file and all (deletions alone would leave the value on disk until a compaction
        // that may never come to so small a family).
        if legacy {
            let cf = self.cf_snapshot();
            let mut batch = WriteBatch::default();
            batch.delete_cf(cf, "meta");
            batch.delete_cf(cf, "data");
            self.db.write(batch).map_err(io_err)?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(true)
    }
}

/// The file at `path`, or `None` if there is none.
fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write a snapshot file at `path` and sync it.
fn write_synced(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let mut line = serde_json::to_vec(meta).map_err(invalid_data)?;
    line.push(b'\n');
    let mut f = File::create(path)?;
    f.write_all(SNAPSHOT_HEADER)?;
    f.write_all(&line)?;
    writeln!(f, "{} {}", data.len(), checksum(&line, data))?;
    f.write_all(data)?;
    f.sync_all()
}

/// The SHA-256 of a snapshot file's meta line and state, in lowercase hex. RocksDB used to
/// checksum the snapshot's blocks; a file of its own has to carry one: a flipped bit in the
/// state can still be valid JSON (a digit, a letter of a key), and would load as another state.
fn checksum(meta_line: &[u8], data: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(meta_line)
        .chain_update(data)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn index(meta: &SnapshotMeta) -> Option<u64> {
    meta.last_log_id.map(|l| l.index())
}

/// The snapshot file at `path`: its meta and its state's encoding, or `None` if there is none.
/// A file whose state is not the length or does not have the checksum written with it is
/// `InvalidData`.
fn read_snapshot_file(path: &Path) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
    let Some(f) = open_existing(path)? else {
        return Ok(None);
    };
    let len = f.metadata()?.len() as usize;
    let mut r = BufReader::new(f);
    let mut header = Vec::new();
    r.read_until(b'\n', &mut header)?;
    let v1 = match header.as_slice() {
        SNAPSHOT_HEADER => false,
        SNAPSHOT_HEADER_V1 => true,
        _ => return Err(invalid_data("not a Concord snapshot file (header)")),
    };
    let mut meta_line = Vec::new();
    r.read_until(b'\n', &mut meta_line)?;
    let meta = serde_json::from_slice(&meta_line).map_err(invalid_data)?;
    let expected = match v1 {
        true => None,
        false => Some(read_sums_line(&mut r)?),
    };
    let mut data = Vec::with_capacity(len);
    r.read_to_end(&mut data)?;
    if let Some((size, sum)) = expected {
        if data.len() != size {
            return Err(invalid_data(format!(
                "snapshot file: the state is {} bytes, {size} were written",
                data.len()
            )));
        }
        if checksum(&meta_line, &data) != sum {
            return Err(invalid_data("snapshot file: checksum mismatch"));
        }
    }
    Ok(Some((meta, data)))
}

/// A snapshot file's line with the state's length and checksum.
fn read_sums_line(r: &mut impl BufRead) -> io::Result<(usize, String)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let parsed = line.strip_suffix('\n').and_then(|l| l.split_once(' '));
    let Some((size, sum)) = parsed else {
        return Err(invalid_data("snapshot file: no length and checksum line"));
    };
    let size = size.parse().map_err(invalid_data)?;
    Ok((size, sum.to_string()))
}

/// Builds a snapshot from a point-in-time copy of the state.
pub struct SnapshotBuilder {
    store: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>, io::Error> {
        let store = self.store.clone();
        let started = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        // A thread of its own, not the blocking pool: it lowers its own priority.
        let encoder = store.clone();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let _ = tx.send(encode(&encoder));
            })?;
        let (meta, data, copied) = rx
            .await
            .map_err(|_| io::Error::other("the snapshot thread panicked"))??;
        let encoded = started.elapsed();
        store
            .shared
            .snapshot_bytes
            .store(data.len(), Ordering::Relaxed);
        // Stored at normal priority (the blocking pool): the file's sync shares the disk with
        // the Raft log's fsyncs, and the log purge waits for it.
        let (meta, data, stored) = tokio::task::spawn_blocking(move || {
            let stored = store.save_snapshot(&meta, &data)?;
            Ok::<_, io::Error>((meta, data, stored))
        })
        .await
        .map_err(io_err)??;
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index()),
            bytes = data.len(),
            copy_us = copied.as_micros() as u64,
            encode_ms = encoded.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            stored,
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

/// Copy the state and encode the copy (on the snapshot thread); also how long the copy took.
fn encode(store: &StateMachineStore) -> io::Result<(SnapshotMeta, Vec<u8>, Duration)> {
    let started = std::time::Instant::now();
    // A copy of the state at `last_applied`, taken under the read lock. The big tables are
    // copy-on-write maps (`sm/cow.rs`): the copy shares their chunks and the apply task, free
    // again once the lock is let go, copies a chunk only when it writes to it before the
    // encoding below is done with it. (The other tables are cloned: small in practice.)
    let image = store.shared.read().clone();
    let copied = started.elapsed();
    // Encoding takes a core for 75-770 ms (docs/benchmarks.md) and every node reaches its
    // snapshot index at about the same time: at normal priority, on a machine as busy as its
    // cores, that time came off the request handlers. The encoding yields to them; it holds no
    // lock and nothing on a request's path waits for it.
    lower_priority();
    let hint = store.shared.snapshot_bytes.load(Ordering::Relaxed);
    let mut data = Vec::with_capacity(hint + hint / 8);
    serde_json::to_writer(&mut data, &image).map_err(invalid_data)?;
    let meta = SnapshotMeta {
        last_log_id: image.last_applied,
        last_membership: image.membership.clone(),
    };
    Ok((meta, data, copied))
}

/// Nice value of the snapshot thread: with the request threads at 0, about a tenth of a
/// contended core (CFS weights), and all of an idle one.
const SNAPSHOT_NICE: i32 = 10;

/// Lower the calling thread's CPU priority to [`SNAPSHOT_NICE`] if it is higher (on Linux the
/// nice value is a per-thread attribute; elsewhere, and if refused, nothing changes).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's id.
        let rc = unsafe {
            let tid = libc::gettid() as libc::id_t;
            if libc::getpriority(libc::PRIO_PROCESS, tid) >= SNAPSHOT_NICE {
                return; // already that low (never raised)
            }
            libc::setpriority(libc::PRIO_PROCESS, tid, SNAPSHOT_NICE)
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(%error, "snapshot thread keeps its priority");
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = self.shared.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last = None;
        let (mut touched, mut wake_all) = (Vec::new(), false);
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            let index = log_id.index();
            let response = {
                let mut st = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
                let response = match &entry.payload {
                    EntryPayload::Normal(e) => st.sm.apply(index, log_id.leader_id.term, e),
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(log_id), m.clone());
                        st.sm.apply_other(index);
                        crate::sm::Response::Done
                    }
                    EntryPayload::Blank => {
                        st.sm.apply_other(index);
                        crate::sm::Response::Done
                    }
                };
                st.last_applied = Some(log_id);
                // Under the state lock, so the history is in apply order and complete before
                // the applied index moves.
                let events = st.sm.take_events();
                wake_all |= touched_leases(&events, &mut touched);
                self.shared.history().push(index, events);
                response
            };
            last = Some(index);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(i) = last {
            self.shared.set_applied(i);
        }
        if wake_all || !touched.is_empty() {
            self.shared.wake_leases(&touched, wake_all);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let mut st: SmState = serde_json::from_slice(&data).map_err(invalid_data)?;
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        let (store, stored_meta) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || store.save_snapshot(&stored_meta, &data))
            .await
            .map_err(io_err)??;
        self.shared.replace(st);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>, io::Error> {
        Ok(self.load_snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::sm::Event;

    /// Snapshot meta up to log index `index`.
    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::blank_ent::<TypeConfig>(1, 1, index).log_id()),
            last_membership: StoredMembership::default(),
        }
    }

    #[test]
    fn an_older_snapshot_does_not_replace_a_newer_one_and_it_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, sm) = super::super::open(dir.path()).unwrap();
            assert!(sm.load_snapshot().unwrap().is_none());
            assert!(sm.save_snapshot(&meta(20), &state(200)).unwrap());
            // A build that copied the state at 10 finishing after an install at 20.
            assert!(!sm.save_snapshot(&meta(10), &state(100)).unwrap());
            assert_eq!(stored(&sm), (20, 200));
            assert!(sm.save_snapshot(&meta(30), &state(300)).unwrap());
            assert_eq!(stored(&sm), (30, 300));
        }
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(stored(&sm), (30, 300));
        assert_eq!(sm.shared.read().sm.time_ms, 300, "loaded on open");
    }

    /// A state at `time_ms`, encoded.
    fn state(time_ms: u64) -> Vec<u8> {
        let mut st = SmState::default();
        st.sm.time_ms = time_ms;
        serde_json::to_vec(&st).unwrap()
    }

    /// The stored snapshot's index and its state's time.
    fn stored(sm: &StateMachineStore) -> (u64, u64) {
        let (m, d) = sm.load_snapshot().unwrap().expect("a snapshot");
        let st: SmState = serde_json::from_slice(&d).unwrap();
        (m.last_log_id.unwrap().index(), st.sm.time_ms)
    }

    /// `bytes` (UTF-8 text) with the one place that holds `from` changed to `to`.
    fn replace_once(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert_eq!(text.matches(from).count(), 1, "{from}");
        text.replace(from, to).into_bytes()
    }

    /// Store a snapshot up to `index` at `time_ms` as versions before the file did.
    fn put_legacy(sm: &StateMachineStore, index: u64, time_ms: u64) {
        let cf = sm.cf_snapshot();
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, "meta", serde_json::to_vec(&meta(index)).unwrap());
        batch.put_cf(cf, "data", state(time_ms));
        sm.db.write(batch).unwrap();
    }

    #[test]
    fn a_snapshot_an_earlier_version_kept_in_rocksdb_is_loaded_until_a_newer_file_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, sm) = super::super::open(dir.path()).unwrap();
            put_legacy(&sm, 10, 100);
        }
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.shared.read().sm.time_ms, 100, "loaded on open");
        assert_eq!(stored(&sm), (10, 100));
        assert!(!sm.save_snapshot(&meta(5), &state(50)).unwrap());
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        assert!(sm.save_snapshot(&meta(20), &state(200)).unwrap());
        assert!(
            sm.load_legacy_snapshot().unwrap().is_none(),
            "the old one goes"
        );
        assert!(!dir.path().join(SNAPSHOT_TMP).exists());
        drop((_log, sm));
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.shared.read().sm.time_ms, 200);
        assert_eq!(stored(&sm), (20, 200));
    }

    #[test]
    fn a_newer_snapshot_in_rocksdb_wins_over_an_older_file_until_a_newer_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A file at 10, then (an earlier version run again, say) RocksDB's at 20.
            let (_log, sm) = super::super::open(dir.path()).unwrap();
            assert!(sm.save_snapshot(&meta(10), &state(100)).unwrap());
            put_legacy(&sm, 20, 200);
        }
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.shared.read().sm.time_ms, 200, "the newer one loaded");
        assert_eq!(stored(&sm), (20, 200));
        assert!(!sm.save_snapshot(&meta(15), &state(150)).unwrap());
        assert_eq!(stored(&sm), (20, 200));
        assert!(sm.save_snapshot(&meta(30), &state(300)).unwrap());
        assert!(sm.load_legacy_snapshot().unwrap().is_none());
        assert_eq!(stored(&sm), (30, 300));
    }

    #[test]
    fn a_half_written_snapshot_is_not_read_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, sm) = super::super::open(dir.path()).unwrap();
            assert!(sm.save_snapshot(&meta(10), &state(100)).unwrap());
        }
        // A crash while the next one was being written.
        let mut half = SNAPSHOT_HEADER.to_vec();
        half.extend_from_slice(&serde_json::to_vec(&meta(20)).unwrap());
        half.extend_from_slice(b"\n{\"last_app");
        std::fs::write(dir.path().join(SNAPSHOT_TMP), &half).unwrap();
        {
            let (_log, sm) = super::super::open(dir.path()).unwrap();
            assert_eq!(stored(&sm), (10, 100));
            assert!(sm.save_snapshot(&meta(20), &state(200)).unwrap());
            assert_eq!(stored(&sm), (20, 200));
        }
        let file = dir.path().join(SNAPSHOT_FILE);
        let whole = std::fs::read(&file).unwrap();
        let fails_to_open = |bytes: &[u8], what: &str| {
            std::fs::write(&file, bytes).unwrap();
            let err = super::super::open(dir.path()).err().expect(what);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
        };
        fails_to_open(&whole[..whole.len() - 3], "a truncated snapshot");
        // Still valid JSON, another state or meta: only the checksum tells.
        let other_state = replace_once(&whole, "\"time_ms\":200", "\"time_ms\":300");
        fails_to_open(&other_state, "another state");
        let other_meta = replace_once(&whole, "\"index\":20}", "\"index\":21}");
        fails_to_open(&other_meta, "another meta");
        let mut lines = whole.splitn(4, |&b| b == b'\n');
        let (header, meta_line, _sums, state) = (
            lines.next().unwrap(),
            lines.next().unwrap(),
            lines.next().unwrap(),
            lines.next().unwrap(),
        );
        let without_sums = [header, meta_line, state].join(&b'\n');
        fails_to_open(&without_sums, "a second version without its checksum line");
        fails_to_open(b"something else\n", "not a snapshot file");
        std::fs::write(&file, &whole).unwrap();
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(stored(&sm), (20, 200));
    }

    #[test]
    fn a_stored_snapshot_damaged_since_does_not_keep_newer_ones_out() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert!(sm.save_snapshot(&meta(20), &state(200)).unwrap());
        // Its meta now claims index 90: only the checksum could tell.
        let file = dir.path().join(SNAPSHOT_FILE);
        let whole = std::fs::read(&file).unwrap();
        std::fs::write(
            &file,
            replace_once(&whole, "\"index\":20}", "\"index\":90}"),
        )
        .unwrap();
        assert!(!sm.save_snapshot(&meta(10), &state(100)).unwrap());
        assert!(sm.save_snapshot(&meta(30), &state(300)).unwrap());
        drop((_log, sm));
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(stored(&sm), (30, 300));
    }

    #[test]
    fn a_snapshot_file_of_the_first_version_without_a_checksum_is_loaded_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        drop(super::super::open(dir.path()).unwrap());
        let mut v1 = SNAPSHOT_HEADER_V1.to_vec();
        v1.extend_from_slice(&serde_json::to_vec(&meta(10)).unwrap());
        v1.push(b'\n');
        v1.extend_from_slice(&state(100));
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &v1).unwrap();
        let (_log, sm) = super::super::open(dir.path()).unwrap();
        assert_eq!(sm.shared.read().sm.time_ms, 100, "loaded on open");
        assert_eq!(stored(&sm), (10, 100));
        assert!(!sm.save_snapshot(&meta(5), &state(50)).unwrap());
        assert!(sm.save_snapshot(&meta(20), &state(200)).unwrap());
        let written = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert!(written.starts_with(SNAPSHOT_HEADER));
        assert_eq!(stored(&sm), (20, 200));
    }

    #[test]
    fn the_snapshot_checksum_is_sha256_of_the_meta_line_and_the_state() {
        // FIPS 180-2's "abc", split across the two parts.
        assert_eq!(
            checksum(b"a", b"bc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_snapshot_thread_lowers_its_own_priority_only() {
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = nice();
        let during = std::thread::spawn(move || {
            lower_priority();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(during, SNAPSHOT_NICE.max(before));
        assert_eq!(nice(), before, "only the calling thread");
    }

    fn shared() -> Arc<SmShared> {
        Arc::new(SmShared {
            state: RwLock::new(SmState::default()),
            applied: watch::channel(0).0,
            history: Mutex::new(WatchLog::new(16)),
            lease_wakers: Mutex::new(HashMap::new()),
            index_waiters: Mutex::new(BTreeMap::new()),
            snapshot_bytes: AtomicUsize::new(0),
            stored_snapshot: Mutex::new(None),
        })
    }

    fn event(kind: &str, detail: serde_json::Value) -> Event {
        Event {
            revision: 1,
            kind: kind.into(),
            name: "x".into(),
            action: "granted".into(),
            detail,
        }
    }

    async fn woke(w: &mut Wakeup) -> bool {
        tokio::time::timeout(Duration::from_millis(20), w.changed())
            .await
            .unwrap_or(false)
    }

    /// Wake the subscribers that the events of one applied batch concern.
    fn apply_events(sh: &SmShared, events: &[Event]) {
        let mut touched = Vec::new();
        let all = touched_leases(events, &mut touched);
        sh.wake_leases(&touched, all);
    }

    #[tokio::test]
    async fn a_lease_wakeup_fires_for_events_naming_its_lease_and_for_deadlocks_only() {
        let sh = shared();
        let (mut one, mut two) = (sh.subscribe_lease(1), sh.subscribe_lease(2));
        apply_events(&sh, &[event("lock", json!({"lease_id": 1, "token": 9}))]);
        assert!(woke(&mut one).await);
        assert!(!woke(&mut two).await);
        apply_events(&sh, &[event("kv", json!({"value": "v"}))]);
        assert!(!woke(&mut one).await && !woke(&mut two).await);
        apply_events(&sh, &[event("deadlock", json!({"lease_id": 7}))]);
        assert!(woke(&mut one).await && woke(&mut two).await);
        // A snapshot replaces everything: every waiter looks again.
        sh.replace(SmState::default());
        assert!(woke(&mut one).await && woke(&mut two).await);
    }

    #[tokio::test]
    async fn an_index_waiter_wakes_when_its_index_is_applied_and_not_before() {
        use futures::FutureExt;
        let sh = shared();
        sh.set_applied(4);
        assert_eq!(sh.wait_applied(4).now_or_never(), Some(true));
        let mut five = Box::pin(sh.wait_applied(5));
        let mut seven = Box::pin(sh.wait_applied(7));
        assert!(five.as_mut().now_or_never().is_none());
        assert!(seven.as_mut().now_or_never().is_none());
        sh.set_applied(6);
        assert_eq!(five.as_mut().now_or_never(), Some(true));
        assert!(seven.as_mut().now_or_never().is_none());
        assert_eq!(sh.index_waiters().len(), 1, "only 7 still waits");
        sh.set_applied(9);
        assert_eq!(seven.as_mut().now_or_never(), Some(true));
        assert!(sh.index_waiters().is_empty());
    }

    #[tokio::test]
    async fn a_lease_wakeup_is_forgotten_with_its_last_subscriber() {
        let sh = shared();
        let (a, b) = (sh.subscribe_lease(3), sh.subscribe_lease(3));
        drop(a);
        assert!(sh.wakers().contains_key(&3));
        drop(b);
        assert!(sh.wakers().is_empty());
        let plain: Wakeup = sh.subscribe().into();
        drop(plain);
        assert!(sh.wakers().is_empty());
    }
}

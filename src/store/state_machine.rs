//! The openraft state-machine adaptor: decodes entries, applies them to the pure [`Sm`],
//! answers the waiting client, and persists snapshots.

use std::io::{self, Cursor};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use futures::{Stream, StreamExt};
use openraft::alias::SnapshotOf;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

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
}

impl SmShared {
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
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
        self.applied.send_replace(index);
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    pub shared: Arc<SmShared>,
    db: Arc<DB>,
}

impl StateMachineStore {
    pub(super) fn open(db: Arc<DB>) -> io::Result<StateMachineStore> {
        let (tx, _) = watch::channel(0);
        let store = StateMachineStore {
            shared: Arc::new(SmShared {
                state: RwLock::new(SmState::default()),
                applied: tx,
                history: Mutex::new(WatchLog::new(DEFAULT_WATCH_HISTORY)),
            }),
            db,
        };
        if let Some((_, data)) = store.load_snapshot()? {
            let st: SmState = serde_json::from_slice(&data).map_err(invalid_data)?;
            store.shared.replace(st);
        }
        Ok(store)
    }

    fn load_snapshot(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let cf = self
            .db
            .cf_handle(CF_SNAPSHOT)
            .expect("snapshot column family");
        let meta = self.db.get_cf(cf, "meta").map_err(io_err)?;
        let data = self.db.get_cf(cf, "data").map_err(io_err)?;
        match (meta, data) {
            (Some(m), Some(d)) => {
                let meta = serde_json::from_slice(&m).map_err(invalid_data)?;
                Ok(Some((meta, d)))
            }
            _ => Ok(None),
        }
    }

    fn save_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
        let cf = self
            .db
            .cf_handle(CF_SNAPSHOT)
            .expect("snapshot column family");
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, "meta", serde_json::to_vec(meta).map_err(invalid_data)?);
        batch.put_cf(cf, "data", data);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(io_err)
    }
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
        tokio::task::spawn_blocking(move || {
            // Serialize under the read lock: the copy is exactly the state at `last_applied`.
            let (meta, data) = {
                let st = store.shared.read();
                let data = serde_json::to_vec(&*st).map_err(invalid_data)?;
                let last = st.last_applied;
                let meta = SnapshotMeta {
                    last_log_id: last,
                    last_membership: st.membership.clone(),
                };
                (meta, data)
            };
            store.save_snapshot(&meta, &data)?;
            Ok(Snapshot {
                meta,
                snapshot: Cursor::new(data),
            })
        })
        .await
        .map_err(io_err)?
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
                self.shared.history().push(index, events);
                response
            };
            last = Some(index);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(i) = last {
            self.shared.applied.send_replace(i);
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
        self.save_snapshot(meta, &data)?;
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

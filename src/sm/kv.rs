//! The KV store: versioned keys, compare-and-set, lease-bound keys and fenced writes.
//! A key's revisions are log indexes, so they are unique and increase across the cluster.

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Fence, Rejection, Response, Sm};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub value: String,
    /// 1 on creation, +1 on every put.
    pub version: u64,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub lease_id: Option<u64>,
}

impl Sm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kv_put(
        &mut self,
        index: u64,
        key: &str,
        value: &str,
        lease_id: Option<u64>,
        if_version: Option<u64>,
        if_absent: bool,
        fence: Option<&Fence>,
    ) -> Response {
        if key.is_empty() {
            return Response::reject(ErrorCode::InvalidArgument, "key must not be empty");
        }
        if let Some(id) = lease_id {
            if !self.leases.contains_key(&id) {
                return lease_not_found(id);
            }
        }
        if let Some(f) = fence {
            let (valid, current) = self.fence_valid(&f.lock, f.token);
            if !valid {
                return Response::Rejected(Rejection {
                    current_token: current,
                    ..Rejection::new(
                        ErrorCode::Fenced,
                        format!(
                            "token {} is not the current token of lock {}",
                            f.token, f.lock
                        ),
                    )
                });
            }
        }
        let current = self.kv.get(key);
        let current_version = current.map_or(0, |e| e.version);
        if let Some(r) = check_version(current_version, if_version, if_absent) {
            return r;
        }
        let (version, create_revision, old_lease) = match current {
            Some(e) => (e.version + 1, e.create_revision, e.lease_id),
            None => (1, index, None),
        };
        if old_lease != lease_id {
            if let Some(l) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            if let Some(l) = lease_id.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.insert(key.to_string());
            }
        }
        self.emit(
            "kv",
            key,
            "put",
            serde_json::json!({"value": value, "version": version, "lease_id": lease_id}),
        );
        self.kv.insert(
            key.to_string(),
            KvEntry {
                value: value.to_string(),
                version,
                create_revision,
                mod_revision: index,
                lease_id,
            },
        );
        Response::KvPut {
            version,
            revision: index,
        }
    }

    pub(super) fn kv_delete(&mut self, index: u64, key: &str, if_version: Option<u64>) -> Response {
        let current_version = self.kv.get(key).map_or(0, |e| e.version);
        if let Some(r) = check_version(current_version, if_version, false) {
            return r;
        }
        match self.kv.remove(key) {
            Some(e) => {
                if let Some(l) = e.lease_id.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(key);
                }
                self.emit("kv", key, "delete", serde_json::json!({}));
                Response::KvDeleted {
                    deleted: true,
                    revision: index,
                }
            }
            None => Response::KvDeleted {
                deleted: false,
                revision: index,
            },
        }
    }
}

/// `if_version` 0 means "the key must not exist", like `if_absent`.
fn check_version(current: u64, if_version: Option<u64>, if_absent: bool) -> Option<Response> {
    let want = if if_absent { Some(0) } else { if_version };
    match want {
        Some(v) if v != current => Some(Response::Rejected(Rejection {
            current_version: Some(current),
            ..Rejection::new(
                ErrorCode::PreconditionFailed,
                format!("expected version {v}, key is at version {current}"),
            )
        })),
        _ => None,
    }
}

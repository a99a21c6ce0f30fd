//! Work queues: items pushed by anyone, each handed to exactly one agent (lease) at a time, until
//! that agent acks it (done) or nacks it (back to the queue), or its lease ends (back to the
//! queue, in that same step).
//!
//! **Claim order.** Pending items are claimed by *virtual arrival*:
//! `pushed_ms + (MAX_PRIORITY - priority) * AGING_MS`, then id (the push entry's log index). As
//! for semaphores (`semaphore.rs`), a priority is a fixed head start, which is the same as every
//! item gaining one priority level per `AGING_MS` it waits: an item of priority `p` pushed at `t`
//! can only be passed by items pushed before `t + (MAX_PRIORITY - p) * AGING_MS`, so it is
//! claimed after at most the items pending when it was pushed plus the ones pushed in the next
//! `(9 - p)` seconds. A returned item keeps its key, so it goes back to its original place.
//!
//! **Fairness across agents.** A claim that finds nothing pending waits (with `wait_ms` > 0) in
//! a FIFO line of claimers, at most once per lease and queue. Each push (or return) hands its
//! item to the first claimer in line in the same apply step, one item per claim. A claim is
//! served at once only when nobody is in line, so later claimers never overtake earlier ones.
//!
//! Invariants (checked by `check_queues`): every item is in exactly one of `pending` and
//! `claimed` (acked items are gone), ids unique; `order` indexes exactly the pending items;
//! claimers and waiters are live leases whose `parts` name the queue, and every lease whose
//! `parts` name the queue has a claim or a wait in it; claimers wait only while nothing is
//! pending; waiters are in arrival order, one timer each; counts and bytes are within bounds
//! and `bytes` is exact; a queue with nothing pending, claimed or waiting is removed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{lease_not_found, ErrorCode, Kind, Response, Sm, AGING_MS, MAX_PRIORITY, MAX_WAIT_MS};

/// Largest item, in bytes.
pub const MAX_ITEM_LEN: usize = 64 * 1024;
/// Most items (pending plus claimed) in one queue.
pub const MAX_QUEUE_ITEMS: usize = 100_000;
/// Most item bytes (pending plus claimed) in one queue.
pub const MAX_QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// Longest line of waiting claimers of one queue.
pub const MAX_QUEUE_WAITERS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    /// Log index of the push entry.
    pub id: u64,
    pub item: String,
    pub priority: u64,
    pub pushed_ms: u64,
    /// How many times it has been claimed (a redelivery count).
    pub claims: u64,
}

impl QueueItem {
    /// Claim order: virtual arrival, then id.
    pub fn order_key(&self) -> (u64, u64) {
        (
            self.pushed_ms + (MAX_PRIORITY - self.priority.min(MAX_PRIORITY)) * AGING_MS,
            self.id,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueClaim {
    pub item: QueueItem,
    pub lease_id: u64,
    /// Log index of the entry that handed it out.
    pub token: u64,
    pub claimed_ms: u64,
    /// The claim request this answers: the index of the claim entry that got it at once or
    /// that queued the waiter it was handed to.
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueWaiter {
    pub lease_id: u64,
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// Index of the claim entry that queued it (arrival order; the ticket of its claim).
    pub seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkQueue {
    /// Pending items by id.
    pub pending: BTreeMap<u64, QueueItem>,
    /// `order_key` of every pending item: the first is claimed next.
    pub order: BTreeSet<(u64, u64)>,
    /// Claimed items by id.
    pub claimed: BTreeMap<u64, QueueClaim>,
    /// Claimers waiting for an item, in arrival order.
    pub waiters: Vec<QueueWaiter>,
    /// Item bytes, pending plus claimed.
    pub bytes: u64,
}

impl WorkQueue {
    pub fn len(&self) -> usize {
        self.pending.len() + self.claimed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.waiters.is_empty()
    }

    /// Pending items in claim order.
    pub fn pending_in_order(&self) -> impl Iterator<Item = &QueueItem> {
        self.order.iter().filter_map(|(_, id)| self.pending.get(id))
    }

    pub(super) fn insert_pending(&mut self, item: QueueItem) {
        self.order.insert(item.order_key());
        self.pending.insert(item.id, item);
    }

    fn pop_pending(&mut self) -> Option<QueueItem> {
        let (_, id) = self.order.pop_first()?;
        self.pending.remove(&id)
    }
}

const KIND: &str = "queue";

impl Sm {
    pub(super) fn queue_push(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        item: &str,
        priority: u64,
    ) -> Response {
        if let Err(r) = check_queue_name(name) {
            return r;
        }
        if item.len() > MAX_ITEM_LEN {
            return Response::reject(
                ErrorCode::PayloadTooLarge,
                format!("item is larger than {MAX_ITEM_LEN} bytes"),
            );
        }
        if priority > MAX_PRIORITY {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("priority must be 0 to {MAX_PRIORITY}"),
            );
        }
        if let Some(q) = self.queues.get(name) {
            if q.len() >= MAX_QUEUE_ITEMS || q.bytes + item.len() as u64 > MAX_QUEUE_BYTES {
                return Response::reject(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "queue {name} is full ({MAX_QUEUE_ITEMS} items or {MAX_QUEUE_BYTES} bytes)"
                    ),
                );
            }
        }
        let q = self.queues.entry(name.to_string()).or_default();
        q.bytes += item.len() as u64;
        q.insert_pending(QueueItem {
            id: index,
            item: item.to_string(),
            priority,
            pushed_ms: now,
            claims: 0,
        });
        self.emit(
            KIND,
            name,
            "pushed",
            json!({"id": index, "priority": priority}),
        );
        let handed = self.queue_hand_off(index, name);
        Response::QueuePushed {
            id: index,
            claimed_by: handed.first().map(|h| h.1),
        }
    }

    pub(super) fn queue_claim(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
    ) -> Response {
        if let Err(r) = check_queue_name(name) {
            return r;
        }
        if wait_ms > MAX_WAIT_MS {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("wait_ms must be at most {MAX_WAIT_MS}"),
            );
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let q = self.queues.entry(name.to_string()).or_default();
        // Already in line: resume that wait (its deadline does not move).
        if let Some(pos) = q.waiters.iter().position(|w| w.lease_id == lease_id) {
            return Response::QueueWaiting {
                position: pos as u64 + 1,
                ticket: q.waiters[pos].seq,
            };
        }
        // Something pending means nobody waits (they would have been handed it).
        if let Some(item) = q.pop_pending() {
            let c = self.queue_give(index, now, name, item, lease_id, index);
            return claimed(&c);
        }
        if wait_ms == 0 || q.waiters.len() >= MAX_QUEUE_WAITERS {
            let r = if wait_ms == 0 {
                Response::reject(
                    ErrorCode::Timeout,
                    format!("queue {name} has no pending item"),
                )
            } else {
                Response::reject(
                    ErrorCode::ResourceExhausted,
                    format!("queue {name} already has {MAX_QUEUE_WAITERS} waiting claimers"),
                )
            };
            if q.is_empty() {
                self.queues.remove(name);
            }
            return r;
        }
        let deadline_ms = now + wait_ms;
        q.waiters.push(QueueWaiter {
            lease_id,
            since_ms: now,
            deadline_ms,
            seq: index,
        });
        let position = q.waiters.len() as u64;
        self.add_timer(deadline_ms, Kind::Queue, name, lease_id);
        self.join_part(lease_id, Kind::Queue, name);
        self.emit(
            KIND,
            name,
            "waiting",
            json!({"lease_id": lease_id, "position": position, "deadline_ms": deadline_ms}),
        );
        Response::QueueWaiting {
            position,
            ticket: index,
        }
    }

    /// Check that `lease_id` holds claimed item `id` of `name`.
    fn queue_check_claimant(&self, name: &str, lease_id: u64, id: u64) -> Result<(), Response> {
        check_queue_name(name)?;
        if !self.leases.contains_key(&lease_id) {
            return Err(lease_not_found(lease_id));
        }
        let q = self.queues.get(name);
        match q.and_then(|q| q.claimed.get(&id)) {
            Some(c) if c.lease_id == lease_id => Ok(()),
            Some(c) => Err(Response::reject(
                ErrorCode::Conflict,
                format!(
                    "item {id} of queue {name} is claimed by lease {}",
                    c.lease_id
                ),
            )),
            None if q.is_some_and(|q| q.pending.contains_key(&id)) => Err(Response::reject(
                ErrorCode::Conflict,
                format!("item {id} of queue {name} is not claimed"),
            )),
            None => Err(Response::reject(
                ErrorCode::NotFound,
                format!("queue {name} has no item {id} (never pushed, or already acked)"),
            )),
        }
    }

    pub(super) fn queue_ack(&mut self, name: &str, lease_id: u64, id: u64) -> Response {
        if let Err(r) = self.queue_check_claimant(name, lease_id, id) {
            return r;
        }
        let Some(q) = self.queues.get_mut(name) else {
            return Response::reject(ErrorCode::NotFound, format!("queue {name} does not exist"));
        };
        if let Some(c) = q.claimed.remove(&id) {
            q.bytes -= c.item.item.len() as u64;
        }
        self.emit(KIND, name, "acked", json!({"id": id, "lease_id": lease_id}));
        self.queue_sync_part(name, lease_id);
        self.queue_gc(name);
        Response::QueueAcked { id }
    }

    /// Give a claimed item back: it returns to its original place and goes to the first
    /// waiting claimer, if any, in this step.
    pub(super) fn queue_nack(
        &mut self,
        index: u64,
        name: &str,
        lease_id: u64,
        id: u64,
    ) -> Response {
        if let Err(r) = self.queue_check_claimant(name, lease_id, id) {
            return r;
        }
        self.queue_return(name, id, "released");
        self.queue_sync_part(name, lease_id);
        let handed = self.queue_hand_off(index, name);
        self.queue_gc(name);
        Response::QueueReturned {
            id,
            claimed_by: handed.iter().find(|h| h.0 == id).map(|h| h.1),
        }
    }

    /// Move claimed item `id` back to pending (its lease links are the caller's business).
    fn queue_return(&mut self, name: &str, id: u64, reason: &str) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let Some(c) = q.claimed.remove(&id) else {
            return;
        };
        q.insert_pending(c.item);
        self.emit(
            KIND,
            name,
            "returned",
            json!({"id": id, "lease_id": c.lease_id, "reason": reason}),
        );
    }

    /// Claim `item` (already out of pending) for `lease_id`.
    fn queue_give(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        mut item: QueueItem,
        lease_id: u64,
        ticket: u64,
    ) -> QueueClaim {
        item.claims += 1;
        let c = QueueClaim {
            item,
            lease_id,
            token: index,
            claimed_ms: now,
            ticket,
        };
        let id = c.item.id;
        if let Some(q) = self.queues.get_mut(name) {
            q.claimed.insert(id, c.clone());
        }
        self.join_part(lease_id, Kind::Queue, name);
        self.emit(
            KIND,
            name,
            "claimed",
            json!({"id": id, "lease_id": lease_id, "token": index, "claims": c.item.claims}),
        );
        c
    }

    /// Hand pending items to waiting claimers, first in line first, one each. Returns the
    /// (item id, lease) pairs handed out.
    fn queue_hand_off(&mut self, index: u64, name: &str) -> Vec<(u64, u64)> {
        let now = self.time_ms;
        let mut handed = Vec::new();
        while let Some(q) = self.queues.get_mut(name) {
            let Some(w) = q.waiters.first().cloned() else {
                break;
            };
            if q.pending.is_empty() {
                break;
            }
            // A waiter whose lease is due at the instant being expired (dead, its end not
            // processed yet, like the claimant's whose items came back) leaves the line instead.
            if !self.leases.contains_key(&w.lease_id) {
                self.queue_unwait(name, w.lease_id, "lease_ended");
                continue;
            }
            let Some(item) = q.pop_pending() else {
                break;
            };
            q.waiters.remove(0);
            self.remove_timer(w.deadline_ms, Kind::Queue, name, w.lease_id);
            let c = self.queue_give(index, now, name, item, w.lease_id, w.seq);
            handed.push((c.item.id, w.lease_id));
        }
        handed
    }

    /// `lease_id` takes part in `name` exactly while it has a claim or a wait there.
    fn queue_sync_part(&mut self, name: &str, lease_id: u64) {
        if self.queue_mentions(name, lease_id) {
            self.join_part(lease_id, Kind::Queue, name);
        } else {
            self.leave_part(lease_id, Kind::Queue, name);
        }
    }

    fn queue_gc(&mut self, name: &str) {
        if self.queues.get(name).is_some_and(|q| q.is_empty()) {
            self.queues.remove(name);
        }
    }

    /// Drop a waiter (its timer too, if still indexed). Returns whether it was there.
    fn queue_unwait(&mut self, name: &str, lease_id: u64, reason: &str) -> bool {
        let Some(q) = self.queues.get_mut(name) else {
            return false;
        };
        let Some(pos) = q.waiters.iter().position(|w| w.lease_id == lease_id) else {
            return false;
        };
        let w = q.waiters.remove(pos);
        self.remove_timer(w.deadline_ms, Kind::Queue, name, lease_id);
        self.emit(
            KIND,
            name,
            "left",
            json!({"lease_id": lease_id, "reason": reason}),
        );
        true
    }

    pub(super) fn queue_timer(&mut self, _index: u64, name: &str, lease_id: u64) {
        self.queue_unwait(name, lease_id, "timeout");
        self.queue_sync_part(name, lease_id);
        self.queue_gc(name);
    }

    /// The lease ended: its wait ends first (so nothing is handed to it), then its claimed
    /// items go back to their places and on to the waiting claimers, in this step.
    pub(super) fn queue_lease_ended(&mut self, index: u64, name: &str, lease_id: u64) {
        self.queue_unwait(name, lease_id, "lease_ended");
        let ids: Vec<u64> = self
            .queues
            .get(name)
            .map(|q| {
                q.claimed
                    .values()
                    .filter(|c| c.lease_id == lease_id)
                    .map(|c| c.item.id)
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            self.queue_return(name, id, "lease_ended");
        }
        self.queue_hand_off(index, name);
        self.queue_gc(name);
    }

    pub(super) fn queue_mentions(&self, name: &str, lease_id: u64) -> bool {
        self.queues.get(name).is_some_and(|q| {
            q.waiters.iter().any(|w| w.lease_id == lease_id)
                || q.claimed.values().any(|c| c.lease_id == lease_id)
        })
    }

    /// Check invariants; returns how many timers this primitive expects in `timers`.
    pub(super) fn check_queues(&self) -> Result<usize, String> {
        let mut timers = 0;
        for (name, q) in &self.queues {
            if name.is_empty() {
                return Err("queue with an empty name".into());
            }
            if q.is_empty() {
                return Err(format!("empty queue {name} kept"));
            }
            if q.len() > MAX_QUEUE_ITEMS || q.bytes > MAX_QUEUE_BYTES {
                return Err(format!("queue {name} over its bounds"));
            }
            if !q.waiters.is_empty() && !q.pending.is_empty() {
                return Err(format!(
                    "queue {name} has claimers waiting while items are pending"
                ));
            }
            let order: BTreeSet<(u64, u64)> = q.pending.values().map(|i| i.order_key()).collect();
            if order != q.order {
                return Err(format!("claim order index of queue {name} out of sync"));
            }
            let mut bytes = 0;
            for (id, i) in &q.pending {
                if q.claimed.contains_key(id) {
                    return Err(format!("item {id} of {name} both pending and claimed"));
                }
                check_item(name, *id, i, self.index, self.time_ms)?;
                bytes += i.item.len() as u64;
            }
            for (id, c) in &q.claimed {
                check_item(name, *id, &c.item, self.index, self.time_ms)?;
                bytes += c.item.item.len() as u64;
                if c.item.claims == 0 || c.token > self.index || c.ticket > c.token {
                    return Err(format!("claim of item {id} of {name} is malformed"));
                }
                self.check_queue_lease(name, c.lease_id, "claimant")?;
            }
            if bytes != q.bytes {
                return Err(format!(
                    "queue {name} counts {} bytes, holds {bytes}",
                    q.bytes
                ));
            }
            let mut seen = BTreeSet::new();
            for w in &q.waiters {
                if !seen.insert(w.lease_id) {
                    return Err(format!("lease {} waits twice on queue {name}", w.lease_id));
                }
                if w.seq > self.index || w.since_ms > self.time_ms || w.deadline_ms <= w.since_ms {
                    return Err(format!("waiter {w:?} of queue {name} is malformed"));
                }
                self.check_queue_lease(name, w.lease_id, "waiter")?;
                let t = super::Timer {
                    kind: Kind::Queue,
                    name: name.clone(),
                    lease_id: w.lease_id,
                };
                if !self.timers.contains(&(w.deadline_ms, t)) {
                    return Err(format!(
                        "waiter {} of queue {name} has no timer",
                        w.lease_id
                    ));
                }
                timers += 1;
            }
            if q.waiters.windows(2).any(|w| w[0].seq >= w[1].seq) {
                return Err(format!("waiters of queue {name} out of arrival order"));
            }
        }
        Ok(timers)
    }

    fn check_queue_lease(&self, name: &str, lease_id: u64, role: &str) -> Result<(), String> {
        match self.leases.get(&lease_id) {
            Some(l) if l.parts.contains(&(Kind::Queue, name.to_string())) => Ok(()),
            Some(_) => Err(format!(
                "{role} {lease_id} of queue {name} does not list it in its parts"
            )),
            None => Err(format!("{role} of queue {name} is dead lease {lease_id}")),
        }
    }
}

fn check_item(name: &str, id: u64, i: &QueueItem, index: u64, now: u64) -> Result<(), String> {
    if i.id != id || id > index || i.pushed_ms > now {
        return Err(format!("item {id} of queue {name} is malformed"));
    }
    if i.priority > MAX_PRIORITY || i.item.len() > MAX_ITEM_LEN {
        return Err(format!("item {id} of queue {name} is out of bounds"));
    }
    Ok(())
}

fn claimed(c: &QueueClaim) -> Response {
    Response::QueueClaimed {
        id: c.item.id,
        item: c.item.item.clone(),
        priority: c.item.priority,
        pushed_ms: c.item.pushed_ms,
        claims: c.item.claims,
        token: c.token,
    }
}

fn check_queue_name(name: &str) -> Result<(), Response> {
    if name.is_empty() {
        return Err(Response::reject(
            ErrorCode::InvalidArgument,
            "queue name must not be empty",
        ));
    }
    Ok(())
}

//! In-process cluster harness: real nodes (RocksDB, HTTP, Raft) on loopback ports from the OS.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use concord::client::Client;
use concord::config::Config;
use concord::node::{self, Running};
use tempfile::TempDir;
use tokio::net::TcpListener;

pub struct TestCluster {
    pub dir: TempDir,
    pub addrs: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, Running>,
    pub snapshot_entries: u64,
    pub keep_logs: u64,
    /// Nodes start with `--enable-fault-injection` (their link fault switch works).
    pub fault_injection: bool,
}

impl TestCluster {
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(n, 20_000, 1000).await
    }

    pub async fn start_with(n: u64, snapshot_entries: u64, keep_logs: u64) -> TestCluster {
        Self::start_full(n, snapshot_entries, keep_logs, false).await
    }

    /// Like `start`, with the nodes' link fault switches enabled.
    pub async fn start_with_faults(n: u64) -> TestCluster {
        Self::start_full(n, 20_000, 1000, true).await
    }

    async fn start_full(
        n: u64,
        snapshot_entries: u64,
        keep_logs: u64,
        fault_injection: bool,
    ) -> TestCluster {
        let dir = TempDir::new().unwrap();
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.insert(id, l.local_addr().unwrap().to_string());
            listeners.insert(id, l);
        }
        let mut c = TestCluster {
            dir,
            addrs: addrs.clone(),
            nodes: BTreeMap::new(),
            snapshot_entries,
            keep_logs,
            fault_injection,
        };
        for (id, l) in listeners {
            let cfg = c.config(id, Some(addrs.clone()));
            let r = node::start_with_listener(cfg, l).await.unwrap();
            c.nodes.insert(id, r);
        }
        c
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    fn config(&self, id: u64, initial: Option<BTreeMap<u64, String>>) -> Config {
        let mut cfg = Config::for_node(id, &self.addrs[&id], self.data_dir(id), initial);
        cfg.snapshot_entries = self.snapshot_entries;
        cfg.keep_logs = self.keep_logs;
        cfg.fault_injection = self.fault_injection;
        cfg
    }

    /// Start a node that joins later (no initialization), on a fresh port.
    pub async fn start_joiner(&mut self, id: u64) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        self.addrs.insert(id, addr.clone());
        let cfg = self.config(id, None);
        let r = node::start_with_listener(cfg, l).await.unwrap();
        self.nodes.insert(id, r);
        addr
    }

    pub async fn kill(&mut self, id: u64) {
        if let Some(r) = self.nodes.remove(&id) {
            r.shutdown().await;
        }
    }

    /// Restart a stopped node with its data, on its old address.
    pub async fn restart(&mut self, id: u64) {
        let addr = self.addrs[&id].clone();
        let mut l = None;
        for _ in 0..100 {
            match TcpListener::bind(&addr).await {
                Ok(x) => {
                    l = Some(x);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let cfg = self.config(id, Some(self.addrs.clone()));
        let r = node::start_with_listener(cfg, l.expect("rebind"))
            .await
            .unwrap();
        self.nodes.insert(id, r);
    }

    /// Wait until the running nodes agree on a leader among them.
    pub async fn wait_leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .values()
                .map(|r| r.node.current_leader())
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if self.nodes.contains_key(l) && leaders.iter().all(|x| x == &Some(*l)) {
                    return *l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until node `id` applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let mut rx = self.nodes[&id].node.sm.subscribe();
        tokio::time::timeout(Duration::from_secs(20), async {
            while *rx.borrow_and_update() < index {
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("node {id} did not apply index {index}"));
    }

    pub fn applied(&self, id: u64) -> u64 {
        self.nodes[&id].node.sm.read().sm.index
    }

    pub fn client(&self, id: u64) -> Client {
        Client::new(&[self.addrs[&id].clone()])
    }

    pub fn client_all(&self) -> Client {
        let eps: Vec<String> = self.nodes.keys().map(|id| self.addrs[id].clone()).collect();
        Client::new(&eps)
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

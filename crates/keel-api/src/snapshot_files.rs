//! How a member's backend travels in raft snapshots: as an etcd backend (bbolt, etcd's schema),
//! so that etcd and Keel members send each other snapshots. Export is keel-migrate's writer over
//! the committed backend; import is its reader, with the member list the sender's backend holds
//! (etcd 3.5+: its `members` bucket) kept where the apply stage looks for it. Between Keel
//! members the committed backend itself is read (keel-server's `records`).
//!
//! Owns nothing; calls the store and keel-migrate.

use anyhow::{Context, Result};
use keel_mvcc::SharedStore;
use keel_server::membership::{Members, AUX_MEMBERS};
use std::path::Path;
use std::sync::Arc;

/// The backend of one member, for its peer transport.
pub struct EtcdBackendFiles {
    pub store: Arc<SharedStore>,
    pub cluster_id: u64,
}

impl keel_server::rafthttp::BackendFiles for EtcdBackendFiles {
    fn export(&self, out: std::fs::File) -> Result<()> {
        keel_migrate::backend::export_staged(&self.backend()?, out)?;
        Ok(())
    }

    fn backend(&self) -> Result<keel_mvcc::backend::Backend> {
        self.store.committed_backend().context("commit before a snapshot")
    }

    fn import(&self, bolt: &Path, dest: &Path) -> Result<()> {
        let db = keel_bbolt::Db::open(bolt).with_context(|| format!("open the received backend {}", bolt.display()))?;
        let imported = keel_migrate::backend::import(&db, dest)?;
        if !imported.members.is_empty() {
            // The member list goes straight into the backend (opening a store would rebuild its
            // key index only to drop it: the install opens the backend again).
            let backend = keel_mvcc::backend::Backend::open(dest)?;
            let mut removed = imported.removed;
            removed.sort_unstable();
            let members = Members { cluster_id: self.cluster_id, members: imported.members, removed };
            let meta = backend.read_meta()?;
            backend.load(&[(keel_mvcc::backend::TABLE_AUX, AUX_MEMBERS.as_bytes().to_vec(), members.encode())], Some(&meta))?;
        }
        Ok(())
    }
}

//! One compaction at a time per lake: a lease object, `_compactions/_lock.json`, created
//! put-if-absent. Two compactors at once could both clean up the other's uploads, so the
//! second one is refused. A lease left by a process that died is taken over: at once when it
//! was held on this host by a process that no longer runs (a `kill -9`), or by this process's
//! pid but not by this process (a restarted container, whose process is pid 1 again), else
//! once it has not been renewed for [`LEASE`].

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::CompactError;
use crate::sink::lake::{read_json, store_err};

/// How long an unrenewed lease holds. The holder renews it after every partition.
pub const LEASE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    started_at: String,
    renewed_at: String,
}

pub struct CompactionLock {
    store: Arc<dyn ObjectStore>,
    path: Path,
    holder: Holder,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The leases this process holds (a `CompactionLock` alive), by path.
static HELD: LazyLock<Mutex<BTreeSet<String>>> = LazyLock::new(Default::default);

fn held_here(path: &Path) -> bool {
    HELD.lock()
        .expect("never poisoned: no panic while held")
        .contains(path.as_ref())
}

fn stale(holder: &Holder, path: &Path) -> bool {
    let holder_gone = if holder.pid == std::process::id() {
        !held_here(path)
    } else {
        !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists()
    };
    let same_host_and_gone = holder.host == host_name() && holder_gone;
    let expired = chrono::DateTime::parse_from_rfc3339(&holder.renewed_at)
        .map(|t| {
            chrono::Utc::now()
                .signed_duration_since(t)
                .to_std()
                .unwrap_or_default()
                > LEASE
        })
        .unwrap_or(true);
    same_host_and_gone || expired
}

impl CompactionLock {
    pub async fn acquire(store: Arc<dyn ObjectStore>, path: Path) -> Result<Self, CompactError> {
        let now = chrono::Utc::now().to_rfc3339();
        let holder = Holder {
            host: host_name(),
            pid: std::process::id(),
            started_at: now.clone(),
            renewed_at: now,
        };
        let lock = Self {
            store,
            path,
            holder,
        };
        for _ in 0..2 {
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match lock.store.put_opts(&lock.path, lock.body(), create).await {
                Ok(_) => {
                    HELD.lock()
                        .expect("never poisoned")
                        .insert(lock.path.to_string());
                    return Ok(lock);
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let theirs: Holder = read_json(&*lock.store, &lock.path).await?;
                    if !stale(&theirs, &lock.path) {
                        return Err(CompactError::Busy(format!(
                            "another compaction holds {} (host {}, pid {}, started {}, renewed {}); \
                             it is taken over once the holder is gone or {} s pass without renewal",
                            lock.path,
                            theirs.host,
                            theirs.pid,
                            theirs.started_at,
                            theirs.renewed_at,
                            LEASE.as_secs()
                        )));
                    }
                    tracing::warn!(host = theirs.host, pid = theirs.pid, "taking over the lease of a compaction that died; the next steps finish or undo its work");
                    lock.store
                        .delete(&lock.path)
                        .await
                        .map_err(store_err(&lock.path))?;
                }
                Err(e) => return Err(store_err(&lock.path)(e).into()),
            }
        }
        Err(CompactError::Busy(format!(
            "{} was taken by another compactor at the same moment",
            lock.path
        )))
    }

    fn body(&self) -> PutPayload {
        PutPayload::from(serde_json::to_vec(&self.holder).expect("serialises"))
    }

    pub async fn renew(&mut self) -> Result<(), CompactError> {
        self.holder.renewed_at = chrono::Utc::now().to_rfc3339();
        self.store
            .put(&self.path, self.body())
            .await
            .map_err(store_err(&self.path))?;
        Ok(())
    }

    /// Deletes the lease. A lease dropped without this (its run aborted) stays in the store
    /// until taken over as a dead holder's.
    pub async fn release(self) -> Result<(), CompactError> {
        self.store
            .delete(&self.path)
            .await
            .map_err(store_err(&self.path))?;
        Ok(())
    }
}

impl Drop for CompactionLock {
    fn drop(&mut self) {
        HELD.lock()
            .expect("never poisoned")
            .remove(self.path.as_ref());
    }
}

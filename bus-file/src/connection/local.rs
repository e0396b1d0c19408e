//! This process's dispatchers of a root: started per queue, woken by
//! file-system events and by this process's publishes.

use std::sync::{Arc, OnceLock, Weak};

use bus_core::{QueueArguments, Result};

use super::Inner;
use crate::consumer::{self, Dispatcher};
use crate::fsys;
use crate::sync::Mutex;
use crate::topology::QueueRecord;
use crate::watch::Seen;

/// Connections of this process by root, so that a publish wakes this
/// process's consumers at once instead of waiting for a file-system event.
pub(super) fn registry() -> &'static Mutex<Vec<Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl Inner {
    /// Hands a message that just became ready in `queue` to every
    /// dispatcher of this process on that queue.
    pub(crate) fn announce(&self, queue: &str, file: &str) {
        let reg = registry().lock().clone();
        for w in reg {
            let Some(other) = w.upgrade() else { continue };
            if other.layout.root != self.layout.root {
                continue;
            }
            let d = other.dispatchers.lock().get(queue).cloned();
            if let Some(d) = d {
                d.offer(file);
            }
        }
    }

    /// Ends the local consumers of a queue that no longer exists.
    pub(crate) fn queue_gone(&self, queue: &str) {
        let reg = registry().lock().clone();
        for w in reg {
            let Some(other) = w.upgrade() else { continue };
            if other.layout.root != self.layout.root {
                continue;
            }
            let d = other.dispatchers.lock().remove(queue);
            if let Some(d) = d {
                other.unwatch(&d);
                d.stop();
            }
        }
    }

    /// Hands what the file-system watch saw to the queue's dispatcher.
    pub(super) fn on_seen(&self, seen: Seen<'_>) {
        match seen {
            Seen::Arrived { queue, file } => {
                let d = self.dispatchers.lock().get(queue).cloned();
                if let Some(d) = d {
                    d.offer(file);
                }
            }
            Seen::Lost => {
                for d in self.dispatchers.lock().values() {
                    d.request_rescan();
                }
            }
        }
    }

    pub(crate) fn unwatch(&self, d: &Dispatcher) {
        if let Some(w) = self.watcher.lock().as_mut() {
            w.unwatch(
                &d.queue,
                &self.layout.fs.display_path(&self.layout.ready(&d.queue)),
            );
        }
    }

    /// The dispatcher of a queue in this connection, started on first use.
    pub(super) fn dispatcher(
        self: &Arc<Self>,
        name: &str,
        record: &QueueRecord,
    ) -> Result<Arc<Dispatcher>> {
        let mut map = self.dispatchers.lock();
        if let Some(d) = map.get(name) {
            if d.queue_id == record.id {
                return Ok(d.clone());
            }
        }
        self.layout
            .fs
            .create_dir_all(&self.layout.claim_dir(name, &self.owner), fsys::DIR_MODE)?;
        let args = QueueArguments::from_table(&record.arguments)?;
        let d = Arc::new(Dispatcher::new(
            name.to_owned(),
            record.id.clone(),
            args,
            self.layout.clone(),
        ));
        {
            if let Some(w) = self.watcher.lock().as_mut() {
                // A watch takes a path, not a folder descriptor: the
                // layout's paths are relative to the root.
                if let Err(e) =
                    w.watch(name, &self.layout.fs.display_path(&self.layout.ready(name)))
                {
                    tracing::warn!(queue = name, error = %e, "no file-system events for queue");
                }
            }
        }
        if let Some(old) = map.insert(name.to_owned(), d.clone()) {
            old.stop();
        }
        tokio::spawn(consumer::run_dispatcher(d.clone(), Arc::downgrade(self)));
        Ok(d)
    }
}

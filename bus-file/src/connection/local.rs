//! This process's dispatchers of a root: started per queue, woken by
//! file-system events and by this process's publishes.

use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};

use bus_core::{QueueArguments, Result};

use super::Inner;
use crate::consumer::{self, Dispatcher};
use crate::fsys;
use crate::sync::Mutex;
use crate::topology::QueueRecord;

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

    pub(super) fn on_fs_event(&self, ev: notify::Result<notify::Event>) {
        use notify::event::{EventKind, ModifyKind, RenameMode};
        let ev = match ev {
            Ok(ev) if !ev.need_rescan() => ev,
            _ => {
                for d in self.dispatchers.lock().values() {
                    d.request_rescan();
                }
                return;
            }
        };
        // Only names arriving matter: a name leaving the ready folder (a
        // claim) offered back would cost a failed claim per message.
        let arriving = match ev.kind {
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any))
            | EventKind::Modify(ModifyKind::Name(RenameMode::Other)) => &ev.paths[..],
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                ev.paths.get(1..).unwrap_or_default()
            }
            _ => return,
        };
        for path in arriving {
            let (Some(file), Some(dir)) = (path.file_name(), path.parent()) else {
                continue;
            };
            if dir.file_name().is_none_or(|n| n != "ready") {
                continue;
            }
            let Some(queue) = dir
                .parent()
                .and_then(Path::file_name)
                .and_then(|q| q.to_str())
            else {
                continue;
            };
            let d = self.dispatchers.lock().get(queue).cloned();
            if let (Some(d), Some(file)) = (d, file.to_str()) {
                d.offer(file);
            }
        }
    }

    pub(crate) fn unwatch(&self, d: &Dispatcher) {
        use notify::Watcher;
        if let Some(w) = self.watcher.lock().as_mut() {
            let _ = w.unwatch(&self.layout.fs.display_path(&self.layout.ready(&d.queue)));
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
            use notify::Watcher;
            if let Some(w) = self.watcher.lock().as_mut() {
                // notify takes a path, not a folder descriptor: the
                // layout's paths are relative to the root.
                if let Err(e) = w.watch(
                    &self.layout.fs.display_path(&self.layout.ready(name)),
                    notify::RecursiveMode::NonRecursive,
                ) {
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

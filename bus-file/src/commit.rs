//! Group commit: publishers that need their renames durable share folder
//! fsyncs. Each waits for the first batch that starts after its rename; one
//! fsync per folder per batch covers every rename made before it, so durable
//! throughput grows with the number of concurrent publishers.
//!
//! A batch starts once no other publish of the connection is still writing
//! its files (they would miss it by microseconds and need a flush of their
//! own) and as many publishes wait as joined the last batch (publishers
//! released by it come back staggered), or after [`MAX_GATHER`] at most,
//! so neither a stream of other publishes nor publishers that stopped can
//! hold it back.
//!
//! On Linux a batch is one `syncfs(2)` of the root's file system instead:
//! it writes back every dirty file and folder of that file system and
//! commits the journal once, so it covers the data of every message file
//! in the batch as well as their directory entries, and publishers skip
//! their per-file fsync. The trade-off: it also flushes unrelated dirty
//! data on the same file system, so a batch can take longer when another
//! program writes heavily there.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{oneshot, Notify};
use tokio::time::{Duration, Instant};

use crate::fsys;
use crate::sync::Mutex;

/// Whether a batch flushes the whole file system (covering file data, so
/// publishers need not fsync their files) rather than fsyncing folders.
pub(crate) const SYNCS_FILE_SYSTEM: bool = cfg!(target_os = "linux");

type Waiter = (
    Arc<fsys::Root>,
    Vec<PathBuf>,
    oneshot::Sender<Result<(), String>>,
);

/// The longest a batch waits for publishes still writing their files.
const MAX_GATHER: Duration = Duration::from_millis(2);

/// Batches folder fsyncs.
#[derive(Debug, Default)]
pub(crate) struct Committer {
    state: Mutex<State>,
    /// A publish finished writing (it joined the batch, or needs none).
    written: Notify,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Waiter>,
    running: bool,
    /// Publishes writing their files, which may join the next batch.
    writing: usize,
    /// How many joined the last batch.
    last: usize,
}

/// A publish writing its files, counted until dropped (or until it joins
/// a batch with [`Committer::sync_dirs`]).
#[derive(Debug)]
pub(crate) struct Writing {
    committer: Arc<Committer>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut st = self.committer.state.lock();
        st.writing -= 1;
        drop(st);
        self.committer.written.notify_one();
    }
}

impl Committer {
    /// Counts a publish as writing until the returned guard is dropped: a
    /// batch about to start waits for it (within [`MAX_GATHER`]).
    pub(crate) fn writing(self: &Arc<Self>) -> Writing {
        self.state.lock().writing += 1;
        Writing {
            committer: self.clone(),
        }
    }

    /// Resolves once every folder in `dirs` (relative to `root`) has been
    /// fsynced by a batch that started after this call. `writing` (this
    /// publish's count) ends once it has joined.
    pub(crate) async fn sync_dirs(
        self: &Arc<Self>,
        root: Arc<fsys::Root>,
        dirs: Vec<PathBuf>,
        writing: Writing,
    ) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock();
            st.pending.push((root, dirs, tx));
            !std::mem::replace(&mut st.running, true)
        };
        drop(writing);
        if start {
            // A task of its own: a publisher whose future is dropped must not
            // strand the others waiting on its batch.
            tokio::spawn(self.clone().run());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other("the commit task ended")),
        }
    }

    /// Waits until no publish is writing and as many wait as joined the
    /// last batch, or [`MAX_GATHER`] has passed.
    async fn gather(&self) {
        let deadline = Instant::now() + MAX_GATHER;
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            {
                let st = self.state.lock();
                if st.writing == 0 && st.pending.len() >= st.last {
                    return;
                }
            }
            tokio::select! {
                _ = &mut written => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            self.gather().await;
            let batch = {
                let mut st = self.state.lock();
                if st.pending.is_empty() {
                    st.running = false;
                    st.last = 0;
                    return;
                }
                st.last = st.pending.len();
                std::mem::take(&mut st.pending)
            };
            let root = batch[0].0.clone();
            let dirs: BTreeSet<PathBuf> = batch
                .iter()
                .flat_map(|(_, d, _)| d.iter().cloned())
                .collect();
            let result = tokio::task::spawn_blocking(move || {
                #[cfg(target_os = "linux")]
                if !dirs.is_empty() {
                    return sync_file_system(&root);
                }
                for d in &dirs {
                    match root.sync_dir(d) {
                        Ok(()) => {}
                        // A queue deleted meanwhile has nothing left to keep.
                        Err(e) if fsys::is_not_found(&e) => {}
                        Err(e) => return Err(format!("fsync of {}: {e}", d.display())),
                    }
                }
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(format!("commit task failed: {e}")));
            for (_, _, tx) in batch {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// Flushes the file system holding the root (every folder of a batch
/// lives under the same root, on one file system: messages are renamed
/// between them).
#[cfg(target_os = "linux")]
fn sync_file_system(root: &fsys::Root) -> Result<(), String> {
    let fd = root
        .dir(std::path::Path::new(""))
        .map_err(|e| format!("syncfs of {}: {e}", root.path().display()))?;
    loop {
        match rustix::fs::syncfs(&fd) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("syncfs of {}: {e}", root.path().display())),
        }
    }
}

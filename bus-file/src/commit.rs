//! Group commit: publishers that need their renames durable share folder
//! fsyncs. Each waits for the first batch that starts after its rename; one
//! fsync per folder per batch covers every rename made before it, so durable
//! throughput grows with the number of concurrent publishers.
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
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::fsys;

/// Whether a batch flushes the whole file system (covering file data, so
/// publishers need not fsync their files) rather than fsyncing folders.
pub(crate) const SYNCS_FILE_SYSTEM: bool = cfg!(target_os = "linux");

type Waiter = (Vec<PathBuf>, oneshot::Sender<Result<(), String>>);

/// Batches folder fsyncs.
#[derive(Debug, Default)]
pub(crate) struct Committer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Waiter>,
    running: bool,
}

impl Committer {
    /// Resolves once every folder in `dirs` has been fsynced by a batch
    /// that started after this call.
    pub(crate) async fn sync_dirs(self: &Arc<Self>, dirs: Vec<PathBuf>) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().expect("committer lock");
            st.pending.push((dirs, tx));
            !std::mem::replace(&mut st.running, true)
        };
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

    async fn run(self: Arc<Self>) {
        loop {
            let batch = {
                let mut st = self.state.lock().expect("committer lock");
                if st.pending.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.pending)
            };
            let dirs: BTreeSet<PathBuf> =
                batch.iter().flat_map(|(d, _)| d.iter().cloned()).collect();
            let result = tokio::task::spawn_blocking(move || {
                #[cfg(target_os = "linux")]
                if let Some(d) = dirs.iter().next() {
                    return sync_file_system(d);
                }
                for d in &dirs {
                    match fsys::sync_dir(d) {
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
            for (_, tx) in batch {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// Flushes the file system holding `dir` (every folder of a batch lives
/// under the same root, on one file system: messages are renamed and hard
/// linked between them).
#[cfg(target_os = "linux")]
fn sync_file_system(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    // Any folder of the root would do; a queue deleted meanwhile leaves the
    // root itself, found by walking up.
    let file = dir
        .ancestors()
        .find_map(|d| std::fs::File::open(d).ok())
        .ok_or_else(|| format!("syncfs of {}: no folder to open", dir.display()))?;
    loop {
        // SAFETY: syncfs takes a valid open descriptor, which `file` owns
        // for the duration of the call.
        if unsafe { libc::syncfs(file.as_raw_fd()) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("syncfs of {}: {e}", dir.display()));
        }
    }
}

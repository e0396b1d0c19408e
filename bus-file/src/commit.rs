//! Group commit: publishers that need their renames durable share folder
//! fsyncs. Each waits for the first batch that starts after its rename; one
//! fsync per folder per batch covers every rename made before it, so durable
//! throughput grows with the number of concurrent publishers.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::fsys;

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

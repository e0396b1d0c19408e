//! File-system events on the `ready/` folders of the queues a connection
//! consumes from, so that a message another process publishes is
//! delivered at once rather than at the next rescan.
//!
//! Only names arriving matter (a file created or renamed in). On Linux the
//! watch is an inotify instance asking for exactly those (`IN_CREATE`,
//! `IN_MOVED_TO`), read by a thread of its own: claims and acks, which
//! rename files out of `ready/` and open the folder, cause no event and
//! wake nobody. Elsewhere it is the `notify` crate's watcher, whose events
//! (every kind) are filtered here.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// What a watch saw.
#[derive(Debug)]
pub(crate) enum Seen<'a> {
    /// The entry `file` arrived in the ready folder of `queue`.
    Arrived {
        /// The queue whose `ready/` folder it is.
        queue: &'a str,
        /// The entry's name.
        file: &'a str,
    },
    /// Events may have been lost (the kernel's queue overflowed): every
    /// watched folder should be listed again.
    Lost,
}

/// Called with what the watch sees, on the watch's own thread or task,
/// never from within [`Watcher::watch`] or [`Watcher::unwatch`]: it may
/// take locks held around those calls.
pub(crate) type Handler = Arc<dyn Fn(Seen<'_>) + Send + Sync>;

/// Watches ready folders until dropped.
pub(crate) struct Watcher(imp::Watcher);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

impl Watcher {
    /// Starts a watch with no folder yet, reporting to `handler`. Must be
    /// called on a tokio runtime.
    pub(crate) fn start(handler: Handler) -> io::Result<Watcher> {
        imp::Watcher::start(handler).map(Watcher)
    }

    /// Watches `dir` (an absolute path), the ready folder of `queue`;
    /// replaces an earlier watch of the queue.
    pub(crate) fn watch(&mut self, queue: &str, dir: &Path) -> io::Result<()> {
        self.0.watch(queue, dir)
    }

    /// Stops watching the ready folder of `queue` (at `dir`).
    pub(crate) fn unwatch(&mut self, queue: &str, dir: &Path) {
        self.0.unwatch(queue, dir);
    }
}

#[cfg(target_os = "linux")]
use self::inotify as imp;
#[cfg(not(target_os = "linux"))]
use self::portable as imp;

#[cfg(target_os = "linux")]
mod inotify {
    use std::collections::HashMap;
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::OwnedFd;
    use std::path::Path;
    use std::sync::Arc;

    use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
    use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
    use rustix::io::Errno;

    use super::{Handler, Seen};
    use crate::sync::Mutex;

    /// The watch descriptors of the watched folders, both ways.
    #[derive(Default)]
    struct Watches {
        queues: HashMap<i32, String>,
        wds: HashMap<String, i32>,
    }

    pub(super) struct Watcher {
        fd: Arc<OwnedFd>,
        /// Written once to stop the thread.
        stop: Arc<OwnedFd>,
        watches: Arc<Mutex<Watches>>,
    }

    impl Watcher {
        pub(super) fn start(handler: Handler) -> io::Result<Watcher> {
            let fd = Arc::new(inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?);
            let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
            let watches = Arc::new(Mutex::new(Watches::default()));
            let (f, s, w) = (fd.clone(), stop.clone(), watches.clone());
            std::thread::Builder::new()
                .name("bus-file-watch".into())
                .spawn(move || run(&f, &s, &w, &handler))?;
            Ok(Watcher { fd, stop, watches })
        }

        pub(super) fn watch(&mut self, queue: &str, dir: &Path) -> io::Result<()> {
            let flags = WatchFlags::CREATE
                | WatchFlags::MOVED_TO
                | WatchFlags::ONLYDIR
                | WatchFlags::DONT_FOLLOW;
            let wd = inotify::add_watch(&*self.fd, dir, flags)?;
            let mut w = self.watches.lock();
            if let Some(old) = w.wds.insert(queue.to_owned(), wd) {
                if old != wd {
                    w.queues.remove(&old);
                    let _ = inotify::remove_watch(&*self.fd, old);
                }
            }
            w.queues.insert(wd, queue.to_owned());
            Ok(())
        }

        pub(super) fn unwatch(&mut self, queue: &str, _dir: &Path) {
            let mut w = self.watches.lock();
            if let Some(wd) = w.wds.remove(queue) {
                w.queues.remove(&wd);
                // Fails harmlessly when the folder is gone (the kernel
                // dropped the watch already).
                let _ = inotify::remove_watch(&*self.fd, wd);
            }
        }
    }

    impl Drop for Watcher {
        fn drop(&mut self) {
            // The thread may be the one dropping the connection (it holds
            // it while handling an event): it is told to stop, not waited
            // for.
            let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        }
    }

    /// The watch's thread: waits for events or the stop signal, and hands
    /// each arriving name to the handler.
    fn run(fd: &OwnedFd, stop: &OwnedFd, watches: &Mutex<Watches>, handler: &Handler) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        loop {
            let mut fds = [
                PollFd::new(fd, PollFlags::IN),
                PollFd::new(stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "file-system events ended; relying on rescans");
                    return;
                }
            }
            if !fds[1].revents().is_empty() {
                return;
            }
            let mut reader = inotify::Reader::new(fd, &mut buf);
            loop {
                let ev = match reader.next() {
                    Ok(ev) => ev,
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "file-system events ended; relying on rescans");
                        handler(Seen::Lost);
                        return;
                    }
                };
                let flags = ev.events();
                if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                    handler(Seen::Lost);
                    continue;
                }
                if flags.contains(ReadFlags::IGNORED) {
                    // The folder went away, or was unwatched.
                    let mut w = watches.lock();
                    if let Some(q) = w.queues.remove(&ev.wd()) {
                        if w.wds.get(&q) == Some(&ev.wd()) {
                            w.wds.remove(&q);
                        }
                    }
                    continue;
                }
                let Some(file) = ev.file_name().and_then(|n| n.to_str().ok()) else {
                    continue;
                };
                // Not held while the handler runs: it takes the locks that
                // `watch` is called under.
                let queue = watches.lock().queues.get(&ev.wd()).cloned();
                if let Some(queue) = queue {
                    handler(Seen::Arrived {
                        queue: &queue,
                        file,
                    });
                }
            }
        }
    }
}

/// The `notify` crate's watcher, for systems without inotify; compiled
/// everywhere so that it keeps building.
#[cfg_attr(target_os = "linux", allow(dead_code))]
mod portable {
    use std::io;
    use std::path::Path;

    use super::{Handler, Seen};

    pub(super) struct Watcher {
        inner: notify::RecommendedWatcher,
    }

    impl Watcher {
        pub(super) fn start(handler: Handler) -> io::Result<Watcher> {
            // The callback runs on notify's own thread, which `watch` and
            // `unwatch` wait on: it only forwards events, and a task
            // hands them to the handler, so no lock of ours is ever taken
            // on that thread.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let inner = notify::recommended_watcher(move |ev| {
                let _ = tx.send(ev);
            })
            .map_err(io::Error::other)?;
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    forward(ev, &handler);
                }
            });
            Ok(Watcher { inner })
        }

        pub(super) fn watch(&mut self, _queue: &str, dir: &Path) -> io::Result<()> {
            use notify::Watcher as _;
            self.inner
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(io::Error::other)
        }

        pub(super) fn unwatch(&mut self, _queue: &str, dir: &Path) {
            use notify::Watcher as _;
            let _ = self.inner.unwatch(dir);
        }
    }

    fn forward(ev: notify::Result<notify::Event>, handler: &Handler) {
        use notify::event::{EventKind, ModifyKind, RenameMode};
        let ev = match ev {
            Ok(ev) if !ev.need_rescan() => ev,
            _ => return handler(Seen::Lost),
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
            let queue = dir
                .parent()
                .and_then(Path::file_name)
                .and_then(|q| q.to_str());
            if let (Some(queue), Some(file)) = (queue, file.to_str()) {
                handler(Seen::Arrived { queue, file });
            }
        }
    }
}

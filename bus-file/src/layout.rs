//! Where everything lives under the root, and the folder operations of a
//! queue (Maildir discipline: write aside, rename in, claim by rename).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fsys;
use crate::names::{check_path_name, MessageName};

/// The on-disk format version this crate writes and reads, stored in the
/// root's `FORMAT` file.
pub const FORMAT_VERSION: u32 = 1;

/// Paths under one root, all relative to it, and the opened root that
/// every operation goes through ([`fsys::Root`]: no symlink below the root
/// is ever followed).
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    /// The canonical path of the root, for messages, watches and telling
    /// roots apart; never used to reach a file.
    pub(crate) root: PathBuf,
    pub(crate) fs: Arc<fsys::Root>,
}

impl Layout {
    pub(crate) fn format_file(&self) -> PathBuf {
        PathBuf::from("FORMAT")
    }
    pub(crate) fn topology_lock(&self) -> PathBuf {
        PathBuf::from("topology.lock")
    }
    pub(crate) fn owners(&self) -> PathBuf {
        PathBuf::from("owners")
    }
    pub(crate) fn owner_lock(&self, owner: &str) -> PathBuf {
        self.owners().join(format!("{owner}.lock"))
    }
    pub(crate) fn tmp(&self) -> PathBuf {
        PathBuf::from("tmp")
    }
    pub(crate) fn quarantine(&self) -> PathBuf {
        PathBuf::from("quarantine")
    }
    pub(crate) fn trash(&self) -> PathBuf {
        PathBuf::from("trash")
    }
    pub(crate) fn queues(&self) -> PathBuf {
        PathBuf::from("queues")
    }
    pub(crate) fn queue(&self, q: &str) -> PathBuf {
        self.queues().join(q)
    }
    pub(crate) fn ready(&self, q: &str) -> PathBuf {
        self.queue(q).join("ready")
    }
    pub(crate) fn claims(&self, q: &str) -> PathBuf {
        self.queue(q).join("claims")
    }
    pub(crate) fn claim_dir(&self, q: &str, owner: &str) -> PathBuf {
        self.claims(q).join(owner)
    }
    pub(crate) fn consumers(&self, q: &str) -> PathBuf {
        self.queue(q).join("consumers")
    }
    pub(crate) fn sac_lock(&self, q: &str) -> PathBuf {
        self.queue(q).join("single-active-consumer.lock")
    }

    /// Creates the folders of the root that every process expects.
    pub(crate) fn create(&self) -> io::Result<()> {
        for d in [
            self.owners(),
            self.tmp(),
            self.quarantine(),
            self.trash(),
            self.queues(),
        ] {
            self.fs.create_dir_all(&d, fsys::DIR_MODE)?;
        }
        Ok(())
    }

    /// Creates a queue's folders.
    pub(crate) fn create_queue(&self, q: &str) -> io::Result<()> {
        for d in [self.ready(q), self.claims(q), self.consumers(q)] {
            self.fs.create_dir_all(&d, fsys::DIR_MODE)?;
        }
        Ok(())
    }

    /// Removes a queue's folder: renamed into the trash first (one atomic
    /// step, after which no claim or publish can land in it), then deleted.
    pub(crate) fn remove_queue_dir(&self, q: &str) -> io::Result<()> {
        let aside = self.trash().join(uuid::Uuid::new_v4().simple().to_string());
        match self.fs.rename(&self.queue(q), &aside) {
            Ok(()) => self.fs.remove_tree(&aside),
            Err(e) if fsys::is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The message names in a folder under the root (anything else is
    /// left out), unsorted.
    pub(crate) fn list_messages(&self, dir: &Path) -> io::Result<Vec<(String, MessageName)>> {
        let mut out = Vec::new();
        for raw in self.fs.list_raw(dir)? {
            let Ok(name) = raw.into_string() else {
                continue;
            };
            if let Some(m) = MessageName::parse(&name) {
                out.push((name, m));
            }
        }
        Ok(out)
    }

    /// Every entry name in a folder that is not a message name (a foreign
    /// or malformed file dropped into a queue), for quarantine; raw, since
    /// it need not be UTF-8.
    pub(crate) fn list_foreign(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let mut out = self.fs.list_raw(dir)?;
        out.retain(|raw| raw.to_str().and_then(MessageName::parse).is_none());
        Ok(out)
    }

    /// Names (UTF-8 ones) of the entries of a folder; empty when missing.
    pub(crate) fn list_names(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(list_utf8(self.fs.list_raw(dir)?))
    }
}

/// The UTF-8 names among raw entry names.
pub(crate) fn list_utf8(raw: Vec<OsString>) -> Vec<String> {
    raw.into_iter()
        .filter_map(|r| r.into_string().ok())
        .collect()
}

/// The queue folders under `queues/` whose names are valid queue names
/// (anything else, which no API call can create, is left alone and
/// reported), so a name read from disk is never a path.
pub(crate) fn list_queue_dirs(layout: &Layout) -> Vec<String> {
    let mut out = layout.list_names(&layout.queues()).unwrap_or_default();
    out.retain(|q| {
        let ok = !q.is_empty() && check_path_name("queue", q).is_ok();
        if !ok {
            tracing::warn!(entry = q, "ignoring a queue folder with an invalid name");
        }
        ok
    });
    out
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub(crate) fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Moves a file that cannot be a message out of the way, into the root's
/// quarantine folder, with the reason in a `.reason` file beside it, so the
/// queue goes on and nothing is silently lost. `path` is relative to the
/// root; its name need not be UTF-8.
pub(crate) fn quarantine(layout: &Layout, queue: &str, path: &Path, reason: &str) {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Short parts, cut by bytes at a character boundary, keep the
    // quarantine name (and its `.reason` companion) within 255 bytes.
    let short_queue = truncate_bytes(queue, 60);
    let short_file = truncate_bytes(&file, 120);
    let name = format!(
        "{short_queue}.{}.{short_file}",
        uuid::Uuid::new_v4().simple(),
    );
    let dest = layout.quarantine().join(&name);
    match layout.fs.rename(path, &dest) {
        Ok(()) => {
            let note = format!("queue: {queue}\nfile: {file}\nreason: {reason}\n",);
            let tmp = layout.tmp().join(format!(".{name}.reason"));
            let _ = layout.fs.write_atomic(
                &tmp,
                &layout.quarantine().join(format!("{name}.reason")),
                note.as_bytes(),
                fsys::FILE_MODE,
                false,
            );
            tracing::warn!(
                queue,
                file,
                reason,
                "quarantined a file that is not a valid message"
            );
        }
        Err(e) if fsys::is_not_found(&e) => {}
        Err(e) => tracing::warn!(queue, file, error = %e, "could not quarantine"),
    }
}

//! Where everything lives under the root, and the folder operations of a
//! queue (Maildir discipline: write aside, rename in, claim by rename).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsys;
use crate::names::MessageName;

/// The on-disk format version this crate writes and reads, stored in the
/// root's `FORMAT` file.
pub const FORMAT_VERSION: u32 = 1;

/// Paths under one root.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
}

impl Layout {
    pub(crate) fn format_file(&self) -> PathBuf {
        self.root.join("FORMAT")
    }
    pub(crate) fn topology(&self) -> PathBuf {
        self.root.join("topology")
    }
    pub(crate) fn topology_lock(&self) -> PathBuf {
        self.root.join("topology.lock")
    }
    pub(crate) fn owners(&self) -> PathBuf {
        self.root.join("owners")
    }
    pub(crate) fn owner_lock(&self, owner: &str) -> PathBuf {
        self.owners().join(format!("{owner}.lock"))
    }
    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub(crate) fn quarantine(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    pub(crate) fn trash(&self) -> PathBuf {
        self.root.join("trash")
    }
    pub(crate) fn queues(&self) -> PathBuf {
        self.root.join("queues")
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
            fsys::create_dir_private(&d, fsys::DIR_MODE)?;
        }
        Ok(())
    }

    /// Creates a queue's folders.
    pub(crate) fn create_queue(&self, q: &str) -> io::Result<()> {
        for d in [self.ready(q), self.claims(q), self.consumers(q)] {
            fsys::create_dir_private(&d, fsys::DIR_MODE)?;
        }
        Ok(())
    }

    /// Removes a queue's folder: renamed into the trash first (one atomic
    /// step, after which no claim or publish can land in it), then deleted.
    pub(crate) fn remove_queue_dir(&self, q: &str) -> io::Result<()> {
        let aside = self.trash().join(uuid::Uuid::new_v4().simple().to_string());
        match fs::rename(self.queue(q), &aside) {
            Ok(()) => fsys::remove_tree(&aside),
            Err(e) if fsys::is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The message names in a folder (anything else is left out), unsorted.
pub(crate) fn list_messages(dir: &Path) -> io::Result<Vec<(String, MessageName)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if fsys::is_not_found(&e) => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(m) = MessageName::parse(&name) {
            out.push((name, m));
        }
    }
    Ok(out)
}

/// Every entry name in a folder that is not a message name (a foreign or
/// malformed file dropped into a queue), for quarantine.
pub(crate) fn list_foreign(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if fsys::is_not_found(&e) => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        match entry.file_name().into_string() {
            Ok(name) if MessageName::parse(&name).is_some() => {}
            Ok(name) => out.push(name),
            Err(raw) => out.push(raw.to_string_lossy().into_owned()),
        }
    }
    Ok(out)
}

/// Names of the sub-folders or files of a folder; empty when it is missing.
pub(crate) fn list_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if fsys::is_not_found(&e) => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        if let Ok(name) = entry?.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}

/// Moves a file that cannot be a message out of the way, into the root's
/// quarantine folder, with the reason in a `.reason` file beside it, so the
/// queue goes on and nothing is silently lost.
pub(crate) fn quarantine(layout: &Layout, queue: &str, path: &Path, reason: &str) {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Short parts keep the quarantine name within the 255-byte limit.
    let short_queue: String = queue.chars().take(60).collect();
    let short_file: String = file.chars().take(120).collect();
    let name = format!(
        "{short_queue}.{}.{short_file}",
        uuid::Uuid::new_v4().simple(),
    );
    let dest = layout.quarantine().join(&name);
    match fs::rename(path, &dest) {
        Ok(()) => {
            let note = format!("queue: {queue}\nfile: {file}\nreason: {reason}\n",);
            let tmp = layout.tmp().join(format!(".{name}.reason"));
            let _ = fsys::write_atomic(
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

//! File-system primitives with the guarantees the transport relies on:
//! private permissions, no symlink following, durable atomic replacement,
//! and advisory locks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Mode of folders the transport creates: private to the user.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of files the transport creates: private to the user.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates a folder (and missing parents) private to the user; an existing
/// one is fine unless it is a symlink, which could lead out of the root.
pub(crate) fn create_dir_private(path: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a folder (a symlink is not followed)",
            path.display()
        )));
    }
    Ok(())
}

/// Reads a whole regular file, refusing symlinks and anything that is not a
/// regular file (a FIFO would block forever).
///
/// Message files are never changed once renamed into place, so one read of
/// the size `fstat` reports (plus one byte, to notice a file that grew)
/// normally reads it all: open, fstat, read, close.
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let size = usize::try_from(meta.len().min(1 << 30)).unwrap_or(1 << 30);
    let mut buf = vec![0u8; size + 1];
    let mut filled = 0;
    loop {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == size {
                    // The size fstat saw, read in full; a file that grew
                    // since would have filled the spare byte instead.
                    break;
                }
                if filled == buf.len() {
                    buf.truncate(filled);
                    f.read_to_end(&mut buf)?;
                    return Ok(buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Creates a new file (failing if the name exists) with `mode`, never
/// through a symlink.
pub(crate) fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Makes a folder's entries durable (a rename or link into it survives a
/// power cut once this returns).
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Writes `bytes` to `dest` atomically: a reader sees the old content or
/// the new, never a part. `tmp` must be on the same file system. With
/// `durable`, the file and the folder are fsynced before returning.
pub(crate) fn write_atomic(
    tmp: &Path,
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    durable: bool,
) -> io::Result<()> {
    let _ = fs::remove_file(tmp);
    let mut f = create_new(tmp, mode)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(tmp, dest)) {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    if durable {
        if let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// An advisory whole-file lock (`flock`), released when dropped or when the
/// process dies, which is what makes it a proof of life.
#[derive(Debug)]
pub(crate) struct FileLock {
    file: File,
}

impl FileLock {
    /// Opens (creating it private if missing) and locks `path` exclusively,
    /// waiting for the lock.
    pub(crate) fn lock(path: &Path) -> io::Result<FileLock> {
        let file = open_lock_file(path, true)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file })
    }

    /// Locks an already open file, waiting; used for lock files created
    /// under a temporary name.
    pub(crate) fn lock_file(file: File) -> io::Result<FileLock> {
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file })
    }

    /// Tries to lock `path` exclusively without waiting. `Ok(None)` when
    /// another open file holds it; `NotFound` when the file is missing.
    pub(crate) fn try_lock(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open_lock_file(path, false)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Tries to lock `path` without waiting, creating it if missing.
    pub(crate) fn try_lock_create(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open_lock_file(path, true)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The locked file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

fn open_lock_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock takes a valid open descriptor, which `file` owns for
        // the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Removes a folder tree without following symlinks out of it.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether an I/O error means "the entry is not there (any more)".
pub(crate) fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

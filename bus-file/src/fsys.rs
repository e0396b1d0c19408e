//! File-system primitives with the guarantees the transport relies on:
//! private permissions, no symlink following, durable atomic replacement,
//! and advisory locks.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

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

/// Reads an open file as [`Root::read_checked`] describes.
pub(crate) fn read_open_checked(
    mut f: File,
    min: u64,
    max: u64,
    single_link: bool,
) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused("not a regular file".into()));
    }
    if single_link && meta.nlink() > 1 {
        return Err(refused(format!(
            "the file has {} names (a hard link), which is refused",
            meta.nlink()
        )));
    }
    let size = meta.len();
    if size < min || size > max {
        return Err(refused(format!(
            "the file is {size} bytes; between {min} and {max} were expected"
        )));
    }
    let size = usize::try_from(size).map_err(|_| refused("too large to read".into()))?;
    let mut buf = vec![0u8; size];
    f.read_exact(&mut buf)
        .map_err(|e| refused(format!("shorter than its size ({e})")))?;
    let mut spare = [0u8; 1];
    if f.read(&mut spare)? != 0 {
        return Err(refused("the file grew while being read".into()));
    }
    Ok(buf)
}

/// An advisory whole-file lock (`flock`), released when dropped or when the
/// process dies, which is what makes it a proof of life.
#[derive(Debug)]
pub(crate) struct FileLock {
    file: File,
}

impl FileLock {
    /// Opens (creating it private if missing) and locks `rel` under
    /// `root` exclusively, waiting for the lock: call it off the runtime
    /// threads.
    pub(crate) fn lock(root: &Root, rel: &Path) -> io::Result<FileLock> {
        let file = root.open_lock(rel, true)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file })
    }

    /// Locks an already open file, waiting; used for lock files created
    /// under a temporary name.
    pub(crate) fn lock_file(file: File) -> io::Result<FileLock> {
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file })
    }

    /// Tries to lock `rel` exclusively without waiting. `Ok(None)` when
    /// another open file holds it; `NotFound` when the file is missing.
    pub(crate) fn try_lock(root: &Root, rel: &Path) -> io::Result<Option<FileLock>> {
        Self::try_locking(root.open_lock(rel, false)?)
    }

    /// Tries to lock `rel` without waiting, creating it if missing.
    pub(crate) fn try_lock_create(root: &Root, rel: &Path) -> io::Result<Option<FileLock>> {
        Self::try_locking(root.open_lock(rel, true)?)
    }

    fn try_locking(file: File) -> io::Result<Option<FileLock>> {
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

/// Whether an I/O error means "the entry is not there (any more)".
pub(crate) fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// A folder opened once, under which every operation walks with
/// `openat(O_NOFOLLOW | O_DIRECTORY)` component by component: a symlink
/// anywhere below it, or a folder swapped for one after it was opened, is
/// an error (`ELOOP` / `ENOTDIR`), never followed. Paths given to it are
/// relative and made of plain components only (no `..`, no root).
///
/// The folder itself is held by descriptor, so renaming or replacing its
/// path later does not redirect the operations either.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn plain_components(rel: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

impl Root {
    /// Opens `path` as a root. Its last component must be a folder, not a
    /// symlink; the components before it are the caller's choice and are
    /// resolved as usual.
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: not a folder, or a symlink ({e})", path.display()),
            )
        })?;
        Ok(Root {
            fd,
            path: path.to_owned(),
        })
    }

    /// The path this root was opened at (for messages and file-system
    /// watches, never for operations).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The absolute path of `rel`, for messages and watches only.
    pub(crate) fn display_path(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// The root's owner, mode and device, from `fstat`.
    pub(crate) fn stat_root(&self) -> io::Result<rustix::fs::Stat> {
        Ok(rustix::fs::fstat(&self.fd)?)
    }

    /// Opens the folder `rel` (the root itself when empty), refusing a
    /// symlink or non-folder at every component.
    pub(crate) fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        // Always a new open file description, never a `dup` of the root's:
        // a dup shares the directory offset, so listing through one would
        // leave the next listing empty. The first component is opened from
        // the root's descriptor directly (the root itself, for an empty
        // path, as `.`).
        let components = plain_components(rel)?;
        let (first, rest) = match components.split_first() {
            Some((first, rest)) => (*first, rest),
            None => (std::ffi::OsStr::new("."), &[][..]),
        };
        let mut fd = rustix::fs::openat(&self.fd, first, DIR_FLAGS, Mode::empty())?;
        for c in rest {
            fd = rustix::fs::openat(&fd, *c, DIR_FLAGS, Mode::empty())?;
        }
        Ok(fd)
    }

    /// Opens the folder `rel` as [`Root::dir`] does, for a run of
    /// operations on its entries without walking to it for each.
    pub(crate) fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        Ok(Dir { fd: self.dir(rel)? })
    }

    /// Opens the parent folder of `rel` and returns it with the last
    /// component's name.
    fn parent<'a>(&self, rel: &'a Path) -> io::Result<(Dir, &'a std::ffi::OsStr)> {
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an empty relative path"))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(parent)?, name))
    }

    /// Creates the folder `rel` and its missing parents with `mode`; an
    /// existing folder is fine, a symlink or file in the way is an error.
    pub(crate) fn create_dir_all(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let mut fd = rustix::fs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())?;
        for c in plain_components(rel)? {
            match rustix::fs::mkdirat(&fd, c, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            fd = rustix::fs::openat(&fd, c, DIR_FLAGS, Mode::empty()).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "{} is not a folder (a symlink is not followed): {e}",
                        self.display_path(rel).display()
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Renames `from` to `to` (both relative to this root).
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.rename_to(from, self, to)
    }

    /// Renames `from` under this root to `to` under `other`.
    pub(crate) fn rename_to(&self, from: &Path, other: &Root, to: &Path) -> io::Result<()> {
        let (a, an) = self.parent(from)?;
        let (b, bn) = other.parent(to)?;
        a.rename_to(an, &b, bn)
    }

    /// Removes the file (or symlink, never its target) `rel`.
    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (d, n) = self.parent(rel)?;
        d.remove_file(n)
    }

    /// Removes the empty folder `rel`.
    pub(crate) fn remove_dir(&self, rel: &Path) -> io::Result<()> {
        let (d, n) = self.parent(rel)?;
        Ok(rustix::fs::unlinkat(&d.fd, n, AtFlags::REMOVEDIR)?)
    }

    /// Removes `rel` and, when it is a folder, everything in it, never
    /// following a symlink (a symlink is removed, not its target).
    /// Missing is fine.
    pub(crate) fn remove_tree(&self, rel: &Path) -> io::Result<()> {
        let (d, n) = match self.parent(rel) {
            Ok(x) => x,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_tree_at(&d.fd, n)
    }

    /// `lstat` of `rel`: a symlink is reported as one.
    pub(crate) fn stat(&self, rel: &Path) -> io::Result<rustix::fs::Stat> {
        let (d, n) = self.parent(rel)?;
        d.stat(n)
    }

    /// Whether `rel` exists (as anything, a symlink included).
    pub(crate) fn exists(&self, rel: &Path) -> bool {
        self.stat(rel).is_ok()
    }

    /// The entry names of the folder `rel` (without `.` and `..`), as
    /// raw names; empty when the folder is missing.
    pub(crate) fn list_raw(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        let fd = match self.dir(rel) {
            Ok(fd) => fd,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(OsString::from_vec(name.to_vec()));
            }
        }
        Ok(out)
    }

    /// Reads the whole regular file `rel`, never through a symlink, after
    /// checking what `fstat` says of it, before allocating anything: its
    /// size must lie in `min..=max`, and with `single_link` it must have
    /// one name only (a hard link to a file elsewhere is refused). A file
    /// that grows while being read is refused too. Refusals are
    /// `InvalidData` errors saying why.
    pub(crate) fn read_checked(
        &self,
        rel: &Path,
        min: u64,
        max: u64,
        single_link: bool,
    ) -> io::Result<Vec<u8>> {
        let (d, n) = self.parent(rel)?;
        d.read_checked(n, min, max, single_link)
    }

    /// Creates the new file `rel` (failing if the name exists) with `mode`.
    pub(crate) fn create_new(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let (d, n) = self.parent(rel)?;
        let fd = rustix::fs::openat(
            &d.fd,
            n,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens (creating it private if missing and `create`) a lock file.
    pub(crate) fn open_lock(&self, rel: &Path, create: bool) -> io::Result<File> {
        let (d, n) = self.parent(rel)?;
        let mut flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if create {
            flags |= OFlags::CREATE;
        }
        let fd = rustix::fs::openat(&d.fd, n, flags, Mode::from_raw_mode(FILE_MODE))?;
        let file = File::from(fd);
        if !file.metadata()?.file_type().is_file() {
            return Err(io::Error::other("a lock file that is not a regular file"));
        }
        Ok(file)
    }

    /// fsyncs the folder `rel`, making its entries durable.
    pub(crate) fn sync_dir(&self, rel: &Path) -> io::Result<()> {
        Ok(rustix::fs::fsync(self.dir(rel)?)?)
    }

    /// Writes `bytes` to `dest` atomically through the temporary name
    /// `tmp` (as [`write_atomic`]), both relative to this root.
    pub(crate) fn write_atomic(
        &self,
        tmp: &Path,
        dest: &Path,
        bytes: &[u8],
        mode: u32,
        durable: bool,
    ) -> io::Result<()> {
        let _ = self.remove_file(tmp);
        let mut f = self.create_new(tmp, mode)?;
        let written = f
            .write_all(bytes)
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        drop(f);
        if let Err(e) = written.and_then(|()| self.rename(tmp, dest)) {
            let _ = self.remove_file(tmp);
            return Err(e);
        }
        if durable {
            self.sync_dir(dest.parent().unwrap_or(Path::new("")))?;
        }
        Ok(())
    }
}

/// A folder below a [`Root`], opened once by its component-by-component
/// walk (no symlink followed), for operations on the entries directly in
/// it. Like the root, it is held by descriptor: renaming or replacing its
/// path later does not redirect the operations, so whoever holds one for
/// long must open it again to see a folder that replaced it. Entry names
/// are single components (no separator), as the transport's names are.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens the folder `name` in this one (not through a symlink).
    pub(crate) fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        Ok(Dir {
            fd: rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())?,
        })
    }

    /// Creates the folder `name` in this one with `mode`; an existing one
    /// is fine (a symlink in its place fails when it is opened).
    pub(crate) fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames the entry `from` of this folder to `to` in `other`.
    pub(crate) fn rename_to(&self, from: &OsStr, other: &Dir, to: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, from, &other.fd, to)?)
    }

    /// Removes the file (or symlink, never its target) `name`.
    pub(crate) fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// `lstat` of the entry `name`: a symlink is reported as one.
    pub(crate) fn stat(&self, name: &OsStr) -> io::Result<rustix::fs::Stat> {
        Ok(rustix::fs::statat(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Whether the entry `name` exists (as anything, a symlink included).
    pub(crate) fn exists(&self, name: &OsStr) -> bool {
        self.stat(name).is_ok()
    }

    /// Opens the file `name` for reading, never through a symlink and
    /// without blocking on a FIFO.
    pub(crate) fn open_read(&self, name: &OsStr) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Reads the regular file `name` as [`Root::read_checked`] does.
    pub(crate) fn read_checked(
        &self,
        name: &OsStr,
        min: u64,
        max: u64,
        single_link: bool,
    ) -> io::Result<Vec<u8>> {
        read_open_checked(self.open_read(name)?, min, max, single_link)
    }
}

fn remove_tree_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        let sub = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&sub)? {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsString::from_vec(n.to_vec()));
            }
        }
        for n in names {
            remove_tree_at(&sub, &n)?;
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    } else {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

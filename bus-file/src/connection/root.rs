//! Opening a root: its folders, who owns them, its on-disk format, and
//! this connection's owner lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bus_core::{Error, Result};

use crate::fsys::{self, FileLock};
use crate::layout::{self, Layout, FORMAT_VERSION};
use crate::names;

fn check_format(layout: &Layout) -> Result<()> {
    let path = layout.format_file();
    let text = match layout.fs.read_checked(&path, 0, 4096, false) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if fsys::is_not_found(&e) => {
            let content = format!("bus-file on-disk format {FORMAT_VERSION}\n");
            let tmp = layout
                .tmp()
                .join(format!(".FORMAT.{}", names::process_tag()));
            layout
                .fs
                .write_atomic(&tmp, &path, content.as_bytes(), fsys::FILE_MODE, true)?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let version = text
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse::<u32>().ok());
    match version {
        Some(FORMAT_VERSION) => Ok(()),
        _ => Err(Error::NotSupported(format!(
            "{} says {:?}; this library reads format {FORMAT_VERSION}",
            layout.root.join(path).display(),
            text.trim()
        ))),
    }
}

/// Opens (creating it private if missing) a root: checks who owns it,
/// creates its folders, checks its format, and creates and locks this
/// connection's owner file.
pub(super) fn open_root(root: &Path, shared_group: bool) -> Result<(Layout, String, FileLock)> {
    let root = normalize_root(root)?;
    fsys::create_dir_private(&root, fsys::DIR_MODE)?;
    let root = root.canonicalize()?;
    let fs = Arc::new(fsys::Root::open(&root)?);
    let layout = Layout {
        root,
        fs: fs.clone(),
    };
    check_owned(&layout, Path::new(""), shared_group)?;
    layout.create()?;
    for d in [
        layout.owners(),
        layout.tmp(),
        layout.quarantine(),
        layout.trash(),
        layout.queues(),
    ] {
        check_owned(&layout, &d, shared_group)?;
    }
    for q in layout::list_queue_dirs(&layout) {
        for d in [
            layout.queue(&q),
            layout.ready(&q),
            layout.claims(&q),
            layout.consumers(&q),
        ] {
            match check_owned(&layout, &d, shared_group) {
                Err(Error::Io(e)) if fsys::is_not_found(&e) => {}
                other => other?,
            }
        }
    }
    check_format(&layout)?;

    let owner = names::new_owner_id();
    // Locked before it has its final name, so no scanner can ever see
    // the lock file of a live connection unlocked.
    let tmp_lock = layout.owners().join(format!(".{owner}.lock.tmp"));
    let lock = FileLock::lock_file(fs.create_new(&tmp_lock, fsys::FILE_MODE)?)?;
    fs.rename(&tmp_lock, &layout.owner_lock(&owner))?;
    lock.file().sync_all()?;
    Ok((layout, owner, lock))
}

/// A root path as given, with `.` and `..` resolved lexically; one that
/// climbs above `/` (`/../..`) is refused rather than taken as `/`.
fn normalize_root(root: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in root.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "the root {} climbs out of its top folder",
                        root.display()
                    )));
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
        }
    }
    if depth == 0 {
        return Err(Error::InvalidArgument(format!(
            "the root {} is a top folder, not a folder of its own",
            root.display()
        )));
    }
    Ok(out)
}

/// Refuses a folder of the root owned by someone else or writable by
/// others (by the group too, unless `shared_group`): whoever can write
/// there can forge, move and delete messages and topology.
fn check_owned(layout: &Layout, rel: &Path, shared_group: bool) -> Result<()> {
    let st = if rel.as_os_str().is_empty() {
        layout.fs.stat_root()?
    } else {
        layout.fs.stat(rel)?
    };
    let me = rustix::process::geteuid().as_raw();
    let mode = st.st_mode;
    let path = layout.root.join(rel);
    if st.st_uid != me && !shared_group {
        return Err(Error::AccessRefused(
            format!(
                "{} is owned by uid {}, not by this user (uid {me}); the file transport \
             refuses a root others control (FileOptions::shared_group relaxes this for \
             a shared group)",
                path.display(),
                st.st_uid
            )
            .into(),
        ));
    }
    let forbidden = if shared_group { 0o002 } else { 0o022 };
    if mode & forbidden != 0 {
        return Err(Error::AccessRefused(
            format!(
                "{} is writable by {} (mode {:o}); the file transport refuses a root \
             others can write into",
                path.display(),
                if mode & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                },
                mode & 0o7777
            )
            .into(),
        ));
    }
    Ok(())
}

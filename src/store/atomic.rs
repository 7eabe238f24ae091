//! Atomic directories on disk: a directory appears under its final name complete or not at
//! all, and disappears the same way. Writes go into a hidden temporary sibling (`.tmp-…`),
//! every file and the directory are fsynced, then it is renamed into place and the parent
//! fsynced; deletes rename to a hidden `.del-…` first. [`sweep_temporaries`] removes what a
//! crash left behind. Owns these mechanics only, not what goes into the files.

use super::error::{Result, StoreError};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const TEMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".del-";

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Write `bytes` to `path` and fsync it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(StoreError::io("create", path))?;
    f.write_all(bytes).map_err(StoreError::io("write", path))?;
    f.sync_all().map_err(StoreError::io("fsync", path))
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", path))
}

/// `create_dir_all`, fsyncing the parent of every directory it creates, so a committed
/// checkpoint's ancestors survive a power loss too.
pub(crate) fn create_dir_all_synced(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_synced(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another writer made it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(StoreError::io("create directory", dir)(e)),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Whether a directory entry's name marks it as one of our hidden temporaries.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'))
}

/// A directory being written; it becomes visible at `dest` only on [`AtomicDir::commit`].
/// Dropped without commit, the temporary is removed.
pub(crate) struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Start writing `dest`, which must not exist yet.
    pub fn begin(dest: &Path, what: &'static str) -> Result<AtomicDir> {
        let parent = dest
            .parent()
            .ok_or_else(|| StoreError::invalid(what, "directory has no parent"))?;
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StoreError::invalid(what, "directory has no UTF-8 name"))?;
        create_dir_all_synced(parent)?;
        if dest.exists() {
            return Err(StoreError::AlreadyExists {
                kind: what,
                id: dest.display().to_string(),
            });
        }
        let tmp = parent.join(format!(
            "{TEMP_PREFIX}{name}-{}-{}",
            std::process::id(),
            nanos()
        ));
        fs::create_dir(&tmp).map_err(StoreError::io("create directory", &tmp))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_owned(),
            committed: false,
        })
    }

    /// Write one file (fsynced) into the directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp.join(name), bytes)
    }

    /// Make the directory visible under its final name, durably.
    pub fn commit(mut self, what: &'static str) -> Result<()> {
        sync_dir(&self.tmp)?;
        if let Err(e) = fs::rename(&self.tmp, &self.dest) {
            return Err(if self.dest.exists() {
                StoreError::AlreadyExists {
                    kind: what,
                    id: self.dest.display().to_string(),
                }
            } else {
                StoreError::io("rename", &self.tmp)(e)
            });
        }
        self.committed = true;
        match self.dest.parent() {
            Some(p) => sync_dir(p),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Remove a directory so that it is never seen half-deleted under its name.
pub(crate) fn remove_dir_atomically(dir: &Path) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| StoreError::invalid("directory", "has no parent"))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = parent.join(format!("{TRASH_PREFIX}{name}-{}", nanos()));
    fs::rename(dir, &trash).map_err(StoreError::io("rename", dir))?;
    sync_dir(parent)?;
    fs::remove_dir_all(&trash).map_err(StoreError::io("remove", &trash))
}

/// Remove every temporary (`.tmp-…`) and half-deleted (`.del-…`) entry under `root`, up to
/// `depth` levels down, not descending into directories for which `keep` is true (finished
/// ones). Returns how many were removed.
pub fn sweep_temporaries(root: &Path, depth: usize, keep: &dyn Fn(&Path) -> bool) -> Result<usize> {
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io("list", root)(e)),
    };
    let mut n = 0;
    let mut removed = false;
    for e in rd {
        let e = e.map_err(StoreError::io("list", root))?;
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ft = e.file_type().map_err(StoreError::io("stat", &path))?;
        if name.starts_with(TEMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
            let r = if ft.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(StoreError::io("remove", &path))?;
            n += 1;
            removed = true;
        } else if ft.is_dir() && depth > 0 && !keep(&path) {
            n += sweep_temporaries(&path, depth - 1, keep)?;
        }
    }
    if removed {
        sync_dir(root)?;
    }
    Ok(n)
}

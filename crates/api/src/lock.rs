//! Exclusive locks on the folders and stores a command writes (a training run, an evaluation
//! run, a retrieval store), so two processes never write one at once.
//!
//! The lock is the operating system's advisory file lock (`flock` on Unix, `LockFileEx` on
//! Windows, through `std::fs::File::try_lock`) on a `.flywheel.lock` file; it ends with the
//! process that holds it, however that process ends, so a lock left by a dead process is simply
//! taken over. The holder writes its process id and command into the file for the error a
//! second process gets.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("{path} is in use by another flywheel process ({holder}); wait for it to finish, or choose another folder")]
    Busy {
        /// The folder or store.
        path: String,
        /// What the holder wrote: its process id and command.
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error("{path}: cannot lock: {error}")]
    Io {
        /// The lock file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl FolderLock {
    /// Locks the folder `dir` (created if missing) through `dir/.flywheel.lock`.
    pub fn folder(dir: &Path) -> Result<Self, LockError> {
        std::fs::create_dir_all(dir).map_err(|e| LockError::Io {
            path: dir.display().to_string(),
            error: e,
        })?;
        Self::take(&dir.join(".flywheel.lock"), dir)
    }

    /// Locks the file `target` (a store) through `<target>.lock` beside it.
    pub fn file(target: &Path) -> Result<Self, LockError> {
        let mut name = target.as_os_str().to_owned();
        name.push(".lock");
        Self::take(Path::new(&name), target)
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take(lock: &Path, what: &Path) -> Result<Self, LockError> {
        let io = |e| LockError::Io {
            path: lock.display().to_string(),
            error: e,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = crate::text::escape(holder.trim(), 200);
                return Err(LockError::Busy {
                    path: what.display().to_string(),
                    holder: if holder.is_empty() {
                        "process unknown".into()
                    } else {
                        holder
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let me = format!(
            "pid {}: {}",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(io)?;
        Ok(Self {
            _file: file,
            path: lock.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_released_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = FolderLock::folder(&run).unwrap();
        let err = FolderLock::folder(&run).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("run") && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        // Released (as when its process dies): taken over.
        let _again = FolderLock::folder(&run).unwrap();
        let store = dir.path().join("docs.sqlite");
        let s = FolderLock::file(&store).unwrap();
        assert_eq!(s.path(), dir.path().join("docs.sqlite.lock"));
        assert!(matches!(
            FolderLock::file(&store),
            Err(LockError::Busy { .. })
        ));
    }
}

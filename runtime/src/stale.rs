//! Removal of what husk's cache keeps beyond its use: entries of one of its directories (the
//! guest kernel's and initramfs's copies, VM templates) whose modification time is older than
//! some age, files or whole directories, but for those still current.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Remove the entries of `dir` not named in `keep` that were last modified more than `age`
/// ago; what cannot be removed is logged and left.
pub fn remove_older_than(dir: &Path, keep: &[&str], age: Duration) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if keep.iter().any(|k| entry.file_name() == **k) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta.modified();
        if !modified.is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a > age)) {
            continue;
        }
        let removed = match meta.is_dir() {
            true => fs::remove_dir_all(entry.path()),
            false => fs::remove_file(entry.path()),
        };
        if let Err(e) = removed {
            log::debug!("removing the old {}: {e}", entry.path().display());
        }
    }
}

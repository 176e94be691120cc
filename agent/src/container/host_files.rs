//! Small host files a spec bind-mounts (Docker's /etc/hosts, /etc/resolv.conf, /etc/hostname).
//! The guest does not see the host's file system, so the host sends their content with
//! CreateContainer and each bind mount of one gets a guest copy instead, written to the
//! container's state directory (a snapshot: the host's later edits do not reach it). Any other
//! bind mount source must exist in the guest.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::spec::is_bind;
use crate::error::{Error, Result};

/// A host file's path (as the spec's bind mounts name it) and its content.
pub struct HostFile {
    pub source: PathBuf,
    pub content: Vec<u8>,
}

/// A guest copy to write: its path and content.
pub struct Copy<'a> {
    pub path: PathBuf,
    pub content: &'a [u8],
}

/// Point the spec's bind mounts of `files` at copies in `dir`, and refuse a bind mount of any
/// other source the guest does not have. Nothing is written yet: the copies are returned.
pub fn redirect<'a>(spec: &mut Spec, files: &'a [HostFile], dir: &Path) -> Result<Vec<Copy<'a>>> {
    let mut seen = HashSet::new();
    for f in files {
        if !f.source.is_absolute() || !seen.insert(&f.source) {
            return Err(Error::InvalidArgument(format!(
                "host file {} is not an absolute path or is given twice",
                f.source.display()
            )));
        }
    }
    let mut copies: Vec<Copy> = Vec::new();
    for m in spec.mounts_mut().iter_mut().flatten().filter(|m| is_bind(m)) {
        // spec::parse has checked that a bind mount has an absolute source.
        let Some(source) = m.source().clone() else { continue };
        if let Some((i, f)) = files.iter().enumerate().find(|(_, f)| f.source == source) {
            // One copy per host file, however many mounts it has.
            let name = match source.file_name() {
                Some(n) => format!("{i}-{}", n.to_string_lossy()),
                None => i.to_string(),
            };
            let path = dir.join(name);
            if !copies.iter().any(|c| c.path == path) {
                copies.push(Copy { path: path.clone(), content: &f.content });
            }
            m.set_source(Some(path));
        } else if fs::symlink_metadata(&source).is_err() {
            return Err(Error::InvalidArgument(format!(
                "bind mount source {} (on {}) does not exist in the guest: bind mounts of host \
                 paths need a shared file system, which husk does not have yet (only small \
                 files sent as host_files can be bind-mounted)",
                source.display(),
                m.destination().display()
            )));
        }
    }
    Ok(copies)
}

/// Write the copies (readable by all, as Docker makes these files) into `dir`, created here.
pub fn write(dir: &Path, copies: &[Copy]) -> Result<()> {
    if copies.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| Error::internal(format!("mkdir {}", dir.display()), &e))?;
    for c in copies {
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&c.path)
            .and_then(|mut f| f.write_all(c.content));
        written.map_err(|e| Error::internal(format!("writing {}", c.path.display()), &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_mounts(mounts: serde_json::Value) -> Spec {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": mounts
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_files_become_copies_and_missing_sources_are_refused() {
        let bind = |src: &str, dst: &str| {
            serde_json::json!({"destination": dst, "type": "bind", "source": src,
                               "options": ["rbind", "rprivate"]})
        };
        let mut spec = spec_with_mounts(serde_json::json!([
            bind("/host/hosts", "/etc/hosts"),
            bind("/host/hosts", "/etc/hosts2"),
            bind("/tmp", "/mnt"),
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]));
        let files = [
            HostFile { source: "/host/hosts".into(), content: b"127.0.0.1 x\n".to_vec() },
            HostFile { source: "/host/unused".into(), content: vec![] },
        ];
        let dir = Path::new("/state/c1/files");
        let copies = redirect(&mut spec, &files, dir).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].path, dir.join("0-hosts"));
        assert_eq!(copies[0].content, b"127.0.0.1 x\n");
        let sources: Vec<_> =
            spec.mounts().iter().flatten().map(|m| m.source().clone().unwrap()).collect();
        let copy = dir.join("0-hosts");
        assert_eq!(sources, [copy.clone(), copy, "/tmp".into(), "proc".into()]);

        let mut spec = spec_with_mounts(serde_json::json!([bind("/host/data", "/data")]));
        let err = redirect(&mut spec, &files, dir).err().unwrap();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("need a shared file system"), "{err}");

        let twice = [
            HostFile { source: "/a".into(), content: vec![] },
            HostFile { source: "/a".into(), content: vec![] },
        ];
        assert!(redirect(&mut spec, &twice, dir).is_err());
    }
}

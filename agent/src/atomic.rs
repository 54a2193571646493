//! Crash-safe file replacement: the one way the agent writes a file that must survive a
//! power cut whole (secrets, desired state, unit files).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

const TMP_SUFFIX: &str = ".tmp";

#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {op}: {source}")]
pub struct Error {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: io::Error,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error { path: path.into(), op, source }
}

/// Creates `dir` and every missing parent at `mode`, each new one's entry synced in its
/// parent: a directory made and not synced is gone after a power cut, with every file
/// in it however well those were synced.
pub fn create_dir_all(dir: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        // Made meanwhile by another writer; a file of that name is still an error.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        r => r.map_err(io_err(dir, "create directory"))?,
    }
    fsync_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// A temp file left by a writer that died between create and rename (a directory of that
/// name is none of ours: removing it as a file would fail every time).
fn is_stale_temp(entry: &fs::DirEntry) -> bool {
    let name = entry.file_name();
    let name = name.to_string_lossy();
    name.starts_with('.') && name.ends_with(TMP_SUFFIX) && entry.file_type().is_ok_and(|t| !t.is_dir())
}

/// Whether `dir` holds temp files a killed writer left, found without writing.
pub fn has_stale_temps(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| entries.flatten().any(|e| is_stale_temp(&e)))
}

/// Removes the temp files a killed writer left.
pub fn remove_stale_temps(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list"))?.flatten() {
        if is_stale_temp(&entry) {
            let p = entry.path();
            fs::remove_file(&p).map_err(io_err(&p, "remove stale temp file"))?;
        }
    }
    Ok(())
}

/// What a file holds: a deliberately broken agent (`failpoint::BREAKAGES`) leaves one fsync
/// out for secrets or for the state alone, so the lazy data root's proof names what it lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Secret,
    State,
    Other,
}

/// Atomically replaces `dir/name` with `bytes` at `mode`: a temp file created exclusively
/// in the same directory, fsynced, renamed over the target, then the directory fsynced. The
/// rename replaces whatever was there (even a root-owned file) without privilege.
pub fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32, kind: Kind) -> Result<(), Error> {
    use crate::failpoint::broken;
    let sync_file = !match kind {
        Kind::Secret => broken("no-secret-fsync"),
        Kind::State => broken("no-state-fsync"),
        Kind::Other => false,
    };
    let tmp = dir.join(format!(".{name}.{}.{:08x}{TMP_SUFFIX}", std::process::id(), rand::rng().next_u32()));
    let target = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        // The umask may have taken bits away; set the mode exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&tmp, "chmod"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        if sync_file {
            f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        }
        fs::rename(&tmp, &target).map_err(io_err(&target, "rename into place"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Removes `dir/name` (already gone is fine) and makes that durable: an unlink whose
/// directory is not synced is undone by a power cut (a removed unit would start again).
pub fn remove(dir: &Path, name: &str) -> Result<(), Error> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => {
            r.map_err(io_err(&path, "remove"))?;
            sync_dir(dir)
        }
    }
}

/// Makes the entries of `dir` (creates, renames, unlinks) durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    if crate::failpoint::broken("no-dir-fsync") {
        return Ok(());
    }
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_dir_all_makes_every_missing_directory_and_refuses_a_file_in_the_way() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        super::create_dir_all(&deep, 0o700).unwrap();
        assert!(deep.is_dir());
        assert_eq!(std::fs::metadata(t.path().join("a/b")).unwrap().permissions().mode() & 0o777, 0o700);
        super::create_dir_all(&deep, 0o700).unwrap(); // there already: nothing to do
        std::fs::write(t.path().join("f"), "").unwrap();
        let e = super::create_dir_all(&t.path().join("f"), 0o700).unwrap_err();
        assert!(e.to_string().contains("cannot create directory"), "{e}");
    }
}

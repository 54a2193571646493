//! Generated secrets: created once, never rotated while valid, healed when damaged.
//!
//! Layout: `<root>/<app>/<target>` (mode 0600) in directories of mode 0700, all owned by
//! the service user the agent runs as. A bcrypt secret is two files: `<target>.pw` holds the
//! password and `<target>` its hash, so the app that needs the password and the app that
//! needs the hash always agree.
//!
//! Healing never needs privilege: a damaged file (even one owned by root) is replaced by
//! renaming a fresh file over it, which only takes write access to the directory we own; a
//! directory in a file's place is first renamed aside, then removed if it can be. Nothing
//! found in the directory is followed or opened in a way that could block (a symlink, a
//! FIFO), the lock file included.
//! Values never reach a log line, an error or a `Debug` output: only names and paths do.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::atomic;

use crate::manifest::{
    Catalog, EnvValue, GeneratedSecret, Manifest, SecretKind, SecretRef, SecretSource,
    BCRYPT_PLAINTEXT_SUFFIX,
};

/// bcrypt work factor: ~50 ms per hash here, paid once per generated secret.
const BCRYPT_COST: u32 = 10;
/// Name of the per-app environment file holding values read from secrets (hidden names
/// cannot collide with secret targets, which may not start with `.`).
pub const ENV_FILE: &str = ".env";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error(transparent)]
    Write(#[from] atomic::Error),
    #[error("{path} is owned by uid {owner}, not by the service user (uid {me}): chown it to the service user, or remove it so the agent recreates it")]
    ForeignDir { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is not a directory: remove it so the agent recreates it")]
    NotADir { path: PathBuf },
    #[error("{path} has mode {mode:o}, not 700: secrets need a directory only the service user can enter; pass a path that does not exist yet (it is created 0700) or a directory of mode 0700")]
    WrongMode { path: PathBuf, mode: u32 },
    #[error("cannot hash secret {path}: {source}")]
    Hash { path: PathBuf, source: bcrypt::BcryptError },
    #[error("app `{app}` reads secret `{reference}`, which no app in the catalog generates")]
    UnknownRef { app: String, reference: SecretRef },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { path: path.into(), op, source }
}

/// Why a secret file was recreated or found unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealReason {
    /// Deleted after the app's secrets directory had been created.
    Missing,
    Empty,
    /// Wrong length, not hex, not a bcrypt hash, or not a regular file.
    Malformed,
    /// A bcrypt hash that does not verify against its password.
    HashMismatch,
    WrongMode,
    WrongOwner,
}

impl HealReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HealReason::Missing => "missing",
            HealReason::Empty => "empty",
            HealReason::Malformed => "malformed",
            HealReason::HashMismatch => "hash_mismatch",
            HealReason::WrongMode => "wrong_mode",
            HealReason::WrongOwner => "wrong_owner",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Valid and left untouched (same inode, bytes and mtime).
    Kept,
    /// Created for the first time.
    Generated,
    /// Recreated because it was damaged.
    Healed(HealReason),
}

/// What [`ensure`] did to one declared secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub target: String,
    pub kind: SecretKind,
    pub outcome: Outcome,
}

/// A secret another app reads that is not usable right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    pub reference: SecretRef,
    pub reason: HealReason,
}

/// Makes every generated secret of `app` exist and be valid under `root`, and writes the
/// app's environment file when its environment reads secrets. Serialised per app by a lock
/// file, so concurrent calls cannot interleave.
pub fn ensure(root: &Path, app: &Manifest) -> Result<Vec<Ensured>, Error> {
    ensure_dir(root)?;
    let out = ensure_in(&root.join(&app.id), &app.generated_secrets)?;
    for e in out.iter().filter(|e| e.outcome != Outcome::Kept) {
        tracing::info!(app = %app.id, secret = %e.target, outcome = ?e.outcome, "secret written");
    }
    Ok(out)
}

/// [`ensure`] for secrets that belong to no app, such as the agent's own API token.
pub fn ensure_in(dir: &Path, secrets: &[GeneratedSecret]) -> Result<Vec<Ensured>, Error> {
    ensure_dir(dir)?;
    // Nothing to do is found out without writing, so that an agent on a read-only data root
    // starts when its secrets are valid. Safe without the lock: every write is a rename, so
    // a concurrent ensure shows old or new files, and a bcrypt pair caught halfway does not
    // verify, which takes the locked path below.
    if ensured_before(dir)
        && !atomic::has_stale_temps(dir)
        && secrets.iter().all(|s| matches!(inspect(dir, s), Ok(None)))
    {
        return Ok(secrets
            .iter()
            .map(|s| Ensured { target: s.target.clone(), kind: s.kind, outcome: Outcome::Kept })
            .collect());
    }
    let lock_path = dir.join(LOCK_FILE);
    let lock = lock(dir)?;
    // An empty lock file means no ensure has completed in this directory: a missing secret
    // is then generated, not healed. Decided under the lock (the directory's existence is
    // not: a concurrent caller may have created it a moment before).
    let first = lock.metadata().map_err(io_err(&lock_path, "stat lock file"))?.len() == 0;
    atomic::remove_stale_temps(dir)?;
    let mut out = Vec::with_capacity(secrets.len());
    for s in secrets {
        let outcome = match repair(dir, s)? {
            None => Outcome::Kept,
            Some(HealReason::Missing) if first => Outcome::Generated,
            Some(r) => Outcome::Healed(r),
        };
        out.push(Ensured { target: s.target.clone(), kind: s.kind, outcome });
    }
    if first {
        (&lock).write_all(b"1").map_err(io_err(&lock_path, "mark the secrets directory ensured"))?;
        // Synced like the secrets: after a power cut a healed secret is not counted generated.
        lock.sync_data().map_err(io_err(&lock_path, "fsync lock file"))?;
    }
    Ok(out)
}

/// Whether an ensure completed in `dir`: its lock file is ours, regular and marked.
fn ensured_before(dir: &Path) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    fs::symlink_metadata(dir.join(LOCK_FILE)).is_ok_and(|m| m.is_file() && m.uid() == me && m.len() > 0)
}

/// Opens and locks `dir/.lock`. Anything else in its place (a planted symlink, a FIFO, a
/// directory, a file of another user) is replaced, never followed or opened; the new file
/// is marked, as whatever stood there was left after an ensure.
fn lock(dir: &Path) -> Result<fs::File, Error> {
    let path = dir.join(LOCK_FILE);
    let me = nix::unistd::geteuid().as_raw();
    // A few rounds: each ends in a locked file, unless someone replaces it meanwhile.
    for _ in 0..3 {
        match fs::symlink_metadata(&path) {
            Ok(m) if !(m.is_file() && m.uid() == me) => replace(dir, LOCK_FILE, b"1")?,
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path, "stat")(e)),
            _ => {}
        }
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => continue, // planted again
            Err(e) => return Err(io_err(&path, "open lock file")(e)),
        };
        file.lock().map_err(io_err(&path, "lock"))?;
        // The lock counts only on the file still at the path (not one replaced meanwhile).
        let held = file.metadata().map_err(io_err(&path, "stat lock file"))?;
        if held.is_file()
            && fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev())
        {
            return Ok(file);
        }
    }
    Err(Error::Io {
        path,
        op: "lock",
        source: io::Error::other("the lock file keeps being replaced by something else"),
    })
}

/// Atomically puts `bytes` at `dir/name`, first moving a directory out of the way: a rename
/// over a directory fails, so a secret replaced by one would never heal.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join(name);
    if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
        // Renamed first (needs only our directory), removed after, when its content lets us:
        // what another user planted inside may stay, hidden, but out of the secret's way.
        let aside = dir.join(format!(".{name}.{}.{:08x}.aside", std::process::id(), rand::rng().next_u32()));
        fs::rename(&path, &aside).map_err(io_err(&path, "move the directory in the secret's place aside"))?;
        if let Err(e) = fs::remove_dir_all(&aside) {
            tracing::warn!(path = %aside.display(), error = %e, "cannot remove a directory moved out of a secret's place");
        }
    }
    Ok(atomic::write(dir, name, bytes, 0o600, atomic::Kind::Secret)?)
}

/// The content of `path` if it is a regular file, read without following a symlink or
/// blocking on a FIFO.
fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(bytes)
}

/// Refuses a secrets root that exists with a mode other than 0700, or is not a directory of
/// ours, and never changes it: an operator's `--dir /tmp` must not chmod /tmp.
pub fn check_root(root: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(root, "stat")(e)),
        Ok(m) if !m.is_dir() => Err(Error::NotADir { path: root.into() }),
        Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() => {
            Err(Error::ForeignDir { path: root.into(), owner: m.uid(), me: nix::unistd::geteuid().as_raw() })
        }
        Ok(m) if m.mode() & 0o7777 != 0o700 => {
            Err(Error::WrongMode { path: root.into(), mode: m.mode() & 0o7777 })
        }
        Ok(_) => Ok(()),
    }
}

/// Writes `<root>/<app>/.env` with the values of the environment variables that read a
/// secret, or removes it when none do. Rewrites only on change, so a converged node writes
/// nothing. Returns whether the file exists afterwards.
pub fn write_env_file(root: &Path, app: &Manifest) -> Result<bool, Error> {
    let dir = root.join(&app.id);
    let path = dir.join(ENV_FILE);
    let mut text = String::new();
    for (key, value) in &app.environment {
        if let EnvValue::Secret(SecretSource { secret }) = value {
            let owner = app
                .secret_files
                .iter()
                .find(|r| &r.name == secret)
                .map_or(app.id.as_str(), |r| r.app.as_str());
            let file = root.join(owner).join(secret);
            let v = read_regular(&file).map_err(io_err(&file, "read secret"))?;
            text.push_str(&format!("{key}={}\n", String::from_utf8_lossy(&v)));
        }
    }
    if text.is_empty() {
        // Checked first: unlinking even a missing file fails on a read-only filesystem.
        let removed = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
        };
        return match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path, "remove")(e)),
            _ => Ok(false),
        };
    }
    // The file's kind and owner first: reading a FIFO planted there would block.
    if !owned_0600(&path) || read_regular(&path).ok().as_deref() != Some(text.as_bytes()) {
        ensure_dir(&dir)?;
        replace(&dir, ENV_FILE, text.as_bytes())?;
    }
    Ok(true)
}

/// Checks that every secret `app` reads through `secret_files` exists and is valid.
pub fn check_complete(root: &Path, app: &Manifest, catalog: &Catalog) -> Result<Vec<Incomplete>, Error> {
    let mut out = Vec::new();
    for r in &app.secret_files {
        let s = catalog
            .generated(r)
            .ok_or_else(|| Error::UnknownRef { app: app.id.clone(), reference: r.clone() })?;
        if let Some(reason) = inspect(&root.join(&r.app), s)? {
            out.push(Incomplete { reference: r.clone(), reason });
        }
    }
    Ok(out)
}

/// Why `s` in `dir` is unusable, or `None` when it is valid.
pub fn inspect(dir: &Path, s: &GeneratedSecret) -> Result<Option<HealReason>, Error> {
    inspect_as(dir, s, nix::unistd::geteuid().as_raw())
}

/// [`inspect`] for secrets that must belong to `owner` (a checker running as another user).
pub fn inspect_as(dir: &Path, s: &GeneratedSecret, owner: u32) -> Result<Option<HealReason>, Error> {
    let path = dir.join(&s.target);
    Ok(match s.kind {
        SecretKind::Hex16 => check_as(&path, owner, |v| hex_check(v, 32))?.err(),
        SecretKind::Hex32 => check_as(&path, owner, |v| hex_check(v, 64))?.err(),
        SecretKind::Bcrypt => match check_as(&pw_path(dir, s), owner, |v| hex_check(v, 32))? {
            Err(r) => Some(r),
            Ok(pw) => check_as(&path, owner, |h| bcrypt_check(&pw, h))?.err(),
        },
    })
}

/// Recreates what is damaged; returns the reason, or `None` if `s` was valid.
fn repair(dir: &Path, s: &GeneratedSecret) -> Result<Option<HealReason>, Error> {
    let path = dir.join(&s.target);
    let hex = |n| -> Result<Option<HealReason>, Error> {
        let reason = check(&path, |v| hex_check(v, n * 2))?.err();
        if reason.is_some() {
            replace(dir, &s.target, random_hex(n).as_bytes())?;
        }
        Ok(reason)
    };
    match s.kind {
        SecretKind::Hex16 => hex(16),
        SecretKind::Hex32 => hex(32),
        SecretKind::Bcrypt => {
            // A valid password is kept and only its hash redone: rotating the password
            // would break the app that already uses it.
            let (pw, pw_reason) = match check(&pw_path(dir, s), |v| hex_check(v, 32))? {
                Ok(pw) => (pw, None),
                Err(r) => {
                    let pw = random_hex(16).into_bytes();
                    replace(dir, &format!("{}{BCRYPT_PLAINTEXT_SUFFIX}", s.target), &pw)?;
                    (pw, Some(r))
                }
            };
            let hash_reason = check(&path, |h| bcrypt_check(&pw, h))?.err();
            if let Some(r) = hash_reason {
                let hash = bcrypt::hash(&pw, BCRYPT_COST)
                    .map_err(|source| Error::Hash { path: path.clone(), source })?;
                replace(dir, &s.target, hash.as_bytes())?;
                return Ok(pw_reason.or(Some(r)));
            }
            Ok(pw_reason)
        }
    }
}

fn pw_path(dir: &Path, s: &GeneratedSecret) -> PathBuf {
    dir.join(format!("{}{BCRYPT_PLAINTEXT_SUFFIX}", s.target))
}

/// Reads `path` if it is a regular file of ours with mode 0600 and content `valid` accepts.
fn check(
    path: &Path,
    valid: impl Fn(&[u8]) -> Option<HealReason>,
) -> Result<Result<Vec<u8>, HealReason>, Error> {
    check_as(path, nix::unistd::geteuid().as_raw(), valid)
}

fn check_as(
    path: &Path,
    owner: u32,
    valid: impl Fn(&[u8]) -> Option<HealReason>,
) -> Result<Result<Vec<u8>, HealReason>, Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(HealReason::Missing)),
        Err(e) => return Err(io_err(path, "stat")(e)),
    };
    if !meta.file_type().is_file() {
        return Ok(Err(HealReason::Malformed));
    }
    if meta.uid() != owner {
        return Ok(Err(HealReason::WrongOwner));
    }
    if meta.mode() & 0o7777 != 0o600 {
        return Ok(Err(HealReason::WrongMode));
    }
    if meta.len() == 0 {
        return Ok(Err(HealReason::Empty));
    }
    let bytes = match read_regular(path) {
        Ok(b) => b,
        // Replaced since the stat (a symlink or a FIFO now): damaged like any such file.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) || e.kind() == io::ErrorKind::InvalidData => {
            return Ok(Err(HealReason::Malformed))
        }
        Err(e) => return Err(io_err(path, "read")(e)),
    };
    Ok(match valid(&bytes) {
        None => Ok(bytes),
        Some(r) => Err(r),
    })
}

fn owned_0600(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| {
        m.is_file() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o7777 == 0o600
    })
}

/// What is wrong with a secret's content (its file's checks aside): `value` is the target's
/// bytes and, for bcrypt, `password` the plaintext beside it. For checks of a node's secrets
/// read from afar, where the files cannot be opened here.
pub fn problem(kind: SecretKind, value: &[u8], password: Option<&Vec<u8>>) -> Option<HealReason> {
    let nonempty = |v: &[u8]| if v.is_empty() { Some(HealReason::Empty) } else { None };
    match kind {
        SecretKind::Hex16 => nonempty(value).or_else(|| hex_check(value, 32)),
        SecretKind::Hex32 => nonempty(value).or_else(|| hex_check(value, 64)),
        SecretKind::Bcrypt => {
            let pw = password.map_or(&[][..], Vec::as_slice);
            nonempty(pw)
                .or_else(|| hex_check(pw, 32))
                .or_else(|| nonempty(value))
                .or_else(|| bcrypt_check(pw, value))
        }
    }
}

fn hex_check(v: &[u8], len: usize) -> Option<HealReason> {
    let ok = v.len() == len && v.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    (!ok).then_some(HealReason::Malformed)
}

/// Digests of (password, hash) pairs already verified: bcrypt costs ~50 ms by design, and
/// the reconciler checks every secret on every tick. Digests, so no value stays in memory.
static VERIFIED: Mutex<Option<HashSet<[u8; 32]>>> = Mutex::new(None);

fn bcrypt_check(pw: &[u8], hash: &[u8]) -> Option<HealReason> {
    let key: [u8; 32] = Sha256::new().chain_update(pw).chain_update([0]).chain_update(hash).finalize().into();
    let verified = || VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    if verified().as_ref().is_some_and(|set| set.contains(&key)) {
        return None;
    }
    let Ok(text) = std::str::from_utf8(hash) else { return Some(HealReason::Malformed) };
    match bcrypt::verify(pw, text) {
        Ok(true) => {
            let mut cache = verified();
            let set = cache.get_or_insert_with(HashSet::new);
            if set.len() >= 1024 {
                set.clear(); // bounded, whatever a heal storm does
            }
            set.insert(key);
            None
        }
        Ok(false) => Some(HealReason::HashMismatch),
        Err(_) => Some(HealReason::Malformed),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates `dir` (mode 0700) if needed, and checks that an existing one is ours.
fn ensure_dir(dir: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(crate::atomic::create_dir_all(dir, 0o700)?),
        Err(e) => Err(io_err(dir, "stat")(e)),
        Ok(m) if !m.is_dir() => Err(Error::NotADir { path: dir.into() }),
        Ok(m) => {
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me {
                return Err(Error::ForeignDir { path: dir.into(), owner: m.uid(), me });
            }
            if m.mode() & 0o7777 != 0o700 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(dir, "chmod 0700"))?;
            }
            Ok(())
        }
    }
}

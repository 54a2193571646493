//! The lazy data root: a FUSE pass-through over a backing directory that forgets, on a power
//! cut, every byte and directory entry that was never synced (Jepsen's LazyFS, for our nodes).
//!
//! Everything is written through to the backing directory at once, so reads, modes, owners
//! and podman's bind mounts see a plain filesystem. What is lazy is the undo kept beside it:
//! each change to a file since its last fsync keeps the bytes it overwrote, and each create,
//! unlink and rename keeps what reverses it until its directory is fsynced (a rename, until
//! both of its directories are). [`Lazy::cut`] applies the undo, newest first, and may tear
//! the last unsynced write of a file (a seeded prefix of it survives); [`Lazy::flush`] drops
//! it, as a clean shutdown syncs everything. The undo lives in memory and in a hidden directory of
//! the backing directory: a cut must come before the daemon goes away.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Attributes and entries are cached by the kernel this long; a cut is followed by a new
/// mount (a reboot), so nothing stale outlives it.
const TTL: Duration = Duration::from_secs(1);

/// The undo's directory in the backing root, which the view does not show.
const UNDO: &str = ".archy-lazy-undo";

/// What a cut lost, relative to the backing directory.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Lost {
    /// Files whose unsynced bytes were dropped.
    pub files: Vec<String>,
    /// Bytes written and never synced (with those of files whose create was reverted).
    pub bytes: u64,
    /// Directory changes reverted (`created a/b`, `removed a/b`, `renamed a -> b`).
    pub entries: Vec<String>,
    /// Files whose last unsynced write kept a prefix: `path: kept/len`.
    pub torn: Vec<String>,
}

/// A file changed since its last fsync.
struct Dirty {
    /// Its size at the last fsync (0 for a file created since).
    size: u64,
    /// The bytes each change overwrote, within `size`, oldest first.
    undo: Vec<(u64, Vec<u8>)>,
    written: u64,
    /// The last write, which a torn cut keeps a prefix of.
    last: Option<(u64, Vec<u8>)>,
}

/// A directory change not yet synced.
enum Change {
    Created {
        dir: u64,
        name: OsString,
    },
    Removed {
        dir: u64,
        name: OsString,
        ino: u64,
        grave: PathBuf,
    },
    Renamed {
        from: (u64, OsString),
        to: (u64, OsString),
        ino: u64,
        replaced: Option<(u64, PathBuf)>,
        synced: [bool; 2],
    },
}

struct State {
    /// Inode (the backing file's own) to path relative to the backing root; root is 1.
    paths: HashMap<u64, PathBuf>,
    root_ino: u64,
    handles: HashMap<u64, (u64, File, bool)>,
    next_fh: u64,
    dirty: HashMap<u64, Dirty>,
    log: Vec<Change>,
    graves: u64,
}

/// The filesystem and its control: one [`Arc`] is the FUSE session's, one the control socket's.
pub struct Lazy {
    backing: PathBuf,
    undo: PathBuf,
    state: Mutex<State>,
}

/// The FUSE side of a [`Lazy`].
struct Fs(Arc<Lazy>);

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn kind(ft: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

impl Lazy {
    /// A lazy view of `backing`. The undo goes to [`UNDO`] inside it (emptied), hidden from
    /// the view: an unlinked file is moved there, which must not cross filesystems.
    pub fn new(backing: &Path) -> Result<Arc<Lazy>> {
        let undo = &backing.join(UNDO);
        let root_ino = std::fs::metadata(backing)
            .with_context(|| format!("backing directory {}", backing.display()))?
            .ino();
        if undo.exists() {
            std::fs::remove_dir_all(undo)?;
        }
        std::fs::create_dir_all(undo)?;
        let paths = HashMap::from([(1, PathBuf::new())]);
        Ok(Arc::new(Lazy {
            backing: backing.into(),
            undo: undo.into(),
            state: Mutex::new(State {
                paths,
                root_ino,
                handles: HashMap::new(),
                next_fh: 1,
                dirty: HashMap::new(),
                log: Vec::new(),
                graves: 0,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one request must not wedge every later one: the state is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget the undo: everything written so far is kept, as a clean shutdown syncs.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        st.dirty.clear();
        st.log.clear();
        drop(st);
        std::fs::remove_dir_all(&self.undo)?;
        std::fs::create_dir_all(&self.undo)?;
        Ok(())
    }

    /// The power cut: every unsynced directory change reverted (newest first), every
    /// unsynced byte dropped; with `tear`, the last unsynced write of each file keeps a
    /// prefix chosen by `seed`. Call it once nothing writes any more.
    pub fn cut(&self, seed: u64, tear: bool) -> Result<Lost> {
        let mut st = self.lock();
        let mut lost = Lost::default();
        let log = std::mem::take(&mut st.log);
        for change in log.into_iter().rev() {
            // A change inside a directory whose removal was synced went with it.
            let gone = |st: &State, dir: u64| !st.paths.contains_key(&dir);
            match change {
                Change::Created { dir, .. } | Change::Removed { dir, .. } if gone(&st, dir) => {}
                Change::Renamed { from, to, .. } if gone(&st, from.0) || gone(&st, to.0) => {}
                Change::Created { dir, name } => {
                    let rel = st.rel(dir, &name);
                    let path = self.backing.join(&rel);
                    let gone = match std::fs::symlink_metadata(&path) {
                        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                        Ok(_) => std::fs::remove_file(&path),
                        Err(e) => Err(e),
                    };
                    if gone.is_ok() {
                        st.forget_under(&rel);
                        lost.entries.push(format!("created {}", rel.display()));
                    }
                }
                Change::Removed { dir, name, ino, grave } => {
                    let rel = st.rel(dir, &name);
                    if std::fs::rename(&grave, self.backing.join(&rel)).is_ok() {
                        st.moved(ino, &rel);
                        lost.entries.push(format!("removed {}", rel.display()));
                    }
                }
                Change::Renamed { from, to, ino, replaced, .. } => {
                    let (old, new) = (st.rel(from.0, &from.1), st.rel(to.0, &to.1));
                    if std::fs::rename(self.backing.join(&new), self.backing.join(&old)).is_ok() {
                        st.moved(ino, &old);
                        lost.entries.push(format!("renamed {} -> {}", old.display(), new.display()));
                    }
                    if let Some((ino, grave)) = replaced {
                        if std::fs::rename(&grave, self.backing.join(&new)).is_ok() {
                            st.moved(ino, &new);
                        }
                    }
                }
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut dirty: Vec<(u64, Dirty)> = st.dirty.drain().collect();
        dirty.sort_by_key(|(ino, _)| *ino);
        for (ino, d) in dirty {
            lost.bytes += d.written; // a file whose create was reverted lost its bytes too
            let Some(rel) = st.paths.get(&ino).cloned() else { continue };
            let Ok(f) = OpenOptions::new().write(true).open(self.backing.join(&rel)) else { continue };
            for (offset, bytes) in d.undo.iter().rev() {
                f.write_all_at(bytes, *offset)?;
            }
            f.set_len(d.size)?;
            lost.files.push(rel.display().to_string());
            if let (true, Some((offset, data))) = (tear, d.last) {
                let kept = rng.random_range(0..=data.len());
                f.write_all_at(&data[..kept], offset)?;
                lost.torn.push(format!("{}: {kept}/{}", rel.display(), data.len()));
            }
        }
        drop(st);
        self.flush()?;
        Ok(lost)
    }

    fn attr(&self, st: &State, ino: u64) -> Result<FileAttr, Errno> {
        let rel = st.paths.get(&ino).ok_or(Errno::ENOENT)?;
        let m = std::fs::symlink_metadata(self.backing.join(rel)).map_err(errno)?;
        Ok(self.to_attr(st, &m))
    }

    fn to_attr(&self, st: &State, m: &std::fs::Metadata) -> FileAttr {
        FileAttr {
            ino: INodeNo(st.ino(m)),
            size: m.size(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(m.file_type()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: m.blksize() as u32,
            flags: 0,
        }
    }

    /// Looks `rel` up in the backing directory and remembers its inode's path.
    fn entry(&self, st: &mut State, rel: PathBuf) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(self.backing.join(&rel)).map_err(errno)?;
        let attr = self.to_attr(st, &m);
        st.paths.insert(attr.ino.0, rel);
        Ok(attr)
    }

    /// A new entry made by the caller: theirs, as on a plain filesystem, and pending.
    fn made(&self, st: &mut State, req: &Request, dir: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let rel = st.rel(dir, name);
        let path = self.backing.join(&rel);
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &path,
            Some(nix::unistd::Uid::from_raw(req.uid())),
            Some(nix::unistd::Gid::from_raw(req.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nix_errno)?;
        st.log.push(Change::Created { dir, name: name.into() });
        self.entry(st, rel)
    }

    /// Keeps the bytes `[offset, offset+len)` hold now (within the synced size) before a change.
    fn before_change(&self, st: &mut State, ino: u64, offset: u64, len: u64) -> Result<(), Errno> {
        let rel = st.paths.get(&ino).ok_or(Errno::ENOENT)?.clone();
        let path = self.backing.join(rel);
        let d = match st.dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let size = std::fs::metadata(&path).map_err(errno)?.len();
                v.insert(Dirty { size, undo: Vec::new(), written: 0, last: None })
            }
        };
        let end = (offset.saturating_add(len)).min(d.size);
        if offset < end {
            let mut old = vec![0; (end - offset) as usize];
            let f = File::open(&path).map_err(errno)?;
            let n = f.read_at(&mut old, offset).map_err(errno)?;
            old.truncate(n);
            d.undo.push((offset, old));
        }
        Ok(())
    }

    fn grave(&self, st: &mut State) -> PathBuf {
        st.graves += 1;
        self.undo.join(format!("grave-{}", st.graves))
    }

    /// A directory fsync: its pending changes become durable (a rename once both sides are).
    fn sync_dir(&self, st: &mut State, dir: u64) {
        let mut kept = Vec::new();
        for mut c in std::mem::take(&mut st.log) {
            let durable = match &mut c {
                Change::Created { dir: d, .. } | Change::Removed { dir: d, .. } => *d == dir,
                Change::Renamed { from, to, synced, .. } => {
                    synced[0] |= from.0 == dir;
                    synced[1] |= to.0 == dir;
                    synced[0] && synced[1]
                }
            };
            if !durable {
                kept.push(c);
                continue;
            }
            let grave = match c {
                Change::Removed { grave, .. } => Some(grave),
                Change::Renamed { replaced, .. } => replaced.map(|(_, g)| g),
                Change::Created { .. } => None,
            };
            if let Some(g) = grave {
                let _ = std::fs::remove_dir_all(&g).or_else(|_| std::fs::remove_file(&g));
            }
        }
        st.log = kept;
    }
}

impl State {
    /// The inode the kernel knows a backing file by: its own, but 1 for the backing root.
    fn ino(&self, m: &std::fs::Metadata) -> u64 {
        if m.ino() == self.root_ino {
            1
        } else {
            m.ino()
        }
    }

    fn rel(&self, dir: u64, name: &OsStr) -> PathBuf {
        self.paths.get(&dir).map_or_else(|| PathBuf::from(name), |p| p.join(name))
    }

    /// `ino` (and, for a directory, everything under it) now lives at `rel`.
    fn moved(&mut self, ino: u64, rel: &Path) {
        let Some(old) = self.paths.get(&ino).cloned() else {
            self.paths.insert(ino, rel.into());
            return;
        };
        for p in self.paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(&old) {
                // `join("")` would add a trailing slash, which names a directory.
                *p = if rest.as_os_str().is_empty() { rel.into() } else { rel.join(rest) };
            }
        }
    }

    fn forget_under(&mut self, rel: &Path) {
        self.paths.retain(|ino, p| *ino == 1 || !p.starts_with(rel));
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.0.lock();
        if parent.0 == 1 && name == UNDO {
            return reply.error(Errno::ENOENT);
        }
        let rel = st.rel(parent.0, name);
        match self.0.entry(&mut st, rel) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.0.lock();
        match self.0.attr(&st, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.0.lock();
        let r = (|| -> Result<FileAttr, Errno> {
            let path = self.0.backing.join(st.paths.get(&ino.0).ok_or(Errno::ENOENT)?);
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    uid.map(nix::unistd::Uid::from_raw),
                    gid.map(nix::unistd::Gid::from_raw),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(nix_errno)?;
            }
            if let Some(size) = size {
                let now = std::fs::metadata(&path).map_err(errno)?.len();
                if size < now {
                    self.0.before_change(&mut st, ino.0, size, now - size)?;
                } else {
                    self.0.before_change(&mut st, ino.0, now, 0)?;
                }
                OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(size)).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let spec = |t: Option<TimeOrNow>| match t {
                    None => nix::sys::time::TimeSpec::UTIME_OMIT,
                    Some(TimeOrNow::Now) => nix::sys::time::TimeSpec::UTIME_NOW,
                    Some(TimeOrNow::SpecificTime(t)) => nix::sys::time::TimeSpec::from_duration(
                        t.duration_since(UNIX_EPOCH).unwrap_or_default(),
                    ),
                };
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    &spec(atime),
                    &spec(mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(nix_errno)?;
            }
            self.0.attr(&st, ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.0.lock();
        let r = st
            .paths
            .get(&ino.0)
            .ok_or(Errno::ENOENT)
            .and_then(|rel| std::fs::read_link(self.0.backing.join(rel)).map_err(errno));
        match r {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.0.lock();
        let path = self.0.backing.join(st.rel(parent.0, name));
        let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & nix::libc::S_IFMT);
        let perm = nix::sys::stat::Mode::from_bits_truncate(mode & !umask & 0o7777);
        let r = nix::sys::stat::mknod(&path, kind, perm, rdev.into())
            .map_err(nix_errno)
            .and_then(|()| self.0.made(&mut st, req, parent.0, name));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut st = self.0.lock();
        let path = self.0.backing.join(st.rel(parent.0, name));
        let r = std::fs::create_dir(&path)
            .and_then(|()| {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask & 0o7777))
            })
            .map_err(errno)
            .and_then(|()| self.0.made(&mut st, req, parent.0, name));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut st = self.0.lock();
        let path = self.0.backing.join(st.rel(parent.0, link_name));
        let r = std::os::unix::fs::symlink(target, &path)
            .map_err(errno)
            .and_then(|()| self.0.made(&mut st, req, parent.0, link_name));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.0.lock();
        let r = (|| -> Result<(), Errno> {
            let (old, new) = (st.rel(parent.0, name), st.rel(newparent.0, newname));
            let (from, to) = (self.0.backing.join(&old), self.0.backing.join(&new));
            let m = std::fs::symlink_metadata(&from).map_err(errno)?;
            let ino = st.ino(&m);
            let target = std::fs::symlink_metadata(&to).ok();
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let replaced = match target {
                Some(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
                Some(t) if t.ino() == m.ino() => return Ok(()), // two names of one file
                Some(t) => {
                    if t.is_dir() != m.is_dir() {
                        return Err(if t.is_dir() { Errno::EISDIR } else { Errno::ENOTDIR });
                    }
                    if t.is_dir() && std::fs::read_dir(&to).map_err(errno)?.next().is_some() {
                        return Err(Errno::ENOTEMPTY);
                    }
                    let grave = self.0.grave(&mut st);
                    std::fs::rename(&to, &grave).map_err(errno)?;
                    Some((st.ino(&t), grave))
                }
                None => None,
            };
            std::fs::rename(&from, &to).map_err(errno)?;
            st.paths.retain(|i, p| *i == 1 || *i == ino || !p.starts_with(&new));
            st.paths.insert(ino, old.clone());
            st.moved(ino, &new);
            let from_key = (parent.0, name.to_os_string());
            let to_key = (newparent.0, newname.to_os_string());
            st.log.push(Change::Renamed { from: from_key, to: to_key, ino, replaced, synced: [false; 2] });
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let mut st = self.0.lock();
        let r = (|| {
            let src = self.0.backing.join(st.paths.get(&ino.0).ok_or(Errno::ENOENT)?);
            let dst = self.0.backing.join(st.rel(newparent.0, newname));
            std::fs::hard_link(&src, &dst).map_err(errno)?;
            st.log.push(Change::Created { dir: newparent.0, name: newname.into() });
            self.0.attr(&st, ino.0)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.0.lock();
        match self.open_handle(&mut st, ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.0.lock();
        let Some((_, f, _)) = st.handles.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0; size as usize];
        match f.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.0.lock();
        let r = (|| {
            let sync = st.handles.get(&fh.0).ok_or(Errno::EBADF)?.2;
            if !sync {
                self.0.before_change(&mut st, ino.0, offset, data.len() as u64)?;
            }
            let (_, f, _) = st.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            f.write_all_at(data, offset).map_err(errno)?;
            if sync {
                // An O_SYNC write is a write and an fsync: the file's earlier bytes too.
                st.dirty.remove(&ino.0);
            } else if let Some(d) = st.dirty.get_mut(&ino.0) {
                d.written += data.len() as u64;
                d.last = Some((offset, data.to_vec()));
            }
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The backing file itself is not synced: the lazy layer is about what the agent
        // asked for, and the node's data root is a test image.
        self.0.lock().dirty.remove(&ino.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let st = self.0.lock();
        let Some(rel) = st.paths.get(&ino.0) else { return reply.error(Errno::ENOENT) };
        let entries = match std::fs::read_dir(self.0.backing.join(rel)) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect::<Vec<_>>(),
            Err(e) => return reply.error(errno(e)),
        };
        let mut all =
            vec![(ino.0, FileType::Directory, OsString::from(".")), (1, FileType::Directory, "..".into())];
        for e in entries {
            let Ok(m) = e.metadata() else { continue };
            if ino.0 == 1 && e.file_name() == UNDO {
                continue;
            }
            all.push((st.ino(&m), kind(m.file_type()), e.file_name()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut st = self.0.lock();
        self.0.sync_dir(&mut st, ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.0.backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(nix_errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.0.lock();
        let r = (|| {
            let path = self.0.backing.join(st.rel(parent.0, name));
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(errno)?;
            let attr = self.0.made(&mut st, req, parent.0, name)?;
            // A new file's synced size is 0: every byte written to it is pending.
            st.dirty.insert(attr.ino.0, Dirty { size: 0, undo: Vec::new(), written: 0, last: None });
            let fh = self.open_handle(
                &mut st,
                attr.ino.0,
                flags & !(nix::libc::O_CREAT | nix::libc::O_EXCL | nix::libc::O_TRUNC),
            )?;
            Ok((attr, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}

impl Fs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let mut st = self.0.lock();
        let r = (|| {
            let rel = st.rel(parent.0, name);
            let path = self.0.backing.join(&rel);
            let m = std::fs::symlink_metadata(&path).map_err(errno)?;
            match (dir, m.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if std::fs::read_dir(&path).map_err(errno)?.next().is_some() => {
                    return Err(Errno::ENOTEMPTY)
                }
                _ => {}
            }
            let ino = st.ino(&m);
            let grave = self.0.grave(&mut st);
            std::fs::rename(&path, &grave).map_err(errno)?;
            st.paths.retain(|i, p| *i == 1 || *p != rel);
            st.log.push(Change::Removed { dir: parent.0, name: name.into(), ino, grave });
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open_handle(&self, st: &mut State, ino: u64, flags: i32) -> Result<u64, Errno> {
        let rel = st.paths.get(&ino).ok_or(Errno::ENOENT)?.clone();
        let acc = flags & nix::libc::O_ACCMODE;
        if flags & nix::libc::O_TRUNC != 0 && acc != nix::libc::O_RDONLY {
            let now = std::fs::metadata(self.0.backing.join(&rel)).map_err(errno)?.len();
            self.0.before_change(st, ino, 0, now)?;
        }
        let f = OpenOptions::new()
            .read(acc != nix::libc::O_WRONLY)
            .write(acc != nix::libc::O_RDONLY)
            .custom_flags(flags & (nix::libc::O_TRUNC | nix::libc::O_NOFOLLOW))
            .open(self.0.backing.join(&rel))
            .map_err(errno)?;
        // O_SYNC and O_DSYNC writes return durable: they are never pending.
        let sync = flags & (nix::libc::O_SYNC | nix::libc::O_DSYNC) != 0;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, (ino, f, sync));
        Ok(fh)
    }
}

/// `archy-chaos lazyfs`: mounts `backing` at `mount` and answers one line commands on the
/// control socket: `cut SEED [tear]` (answers the [`Lost`] JSON, then unmounts and exits, as
/// the power goes), `flush` (answers `{}`), `unmount` (flushes, unmounts, exits).
pub fn serve(backing: &Path, mount: &Path, control: &Path) -> Result<()> {
    let lazy = Lazy::new(backing)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("archy-lazy".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    let _ = std::fs::remove_file(control);
    let listener = std::os::unix::net::UnixListener::bind(control)
        .with_context(|| format!("control socket {}", control.display()))?;
    let session = fuser::spawn_mount(Fs(lazy.clone()), mount, &config)
        .with_context(|| format!("cannot mount the lazy filesystem at {}", mount.display()))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (answer, last) = match words.as_slice() {
            ["cut", seed, rest @ ..] => match seed.parse() {
                Ok(seed) => (serde_json::to_string(&lazy.cut(seed, rest == ["tear"])?)?, true),
                Err(_) => (format!("{{\"error\":\"bad seed {seed}\"}}"), false),
            },
            ["flush"] => (lazy.flush().map(|()| "{}".to_string())?, false),
            ["unmount"] => (lazy.flush().map(|()| "{}".to_string())?, true),
            _ => (format!("{{\"error\":\"unknown command {:?}\"}}", line.trim()), false),
        };
        let _ = writeln!(conn, "{answer}"); // a client that hung up changes nothing
        if last {
            break;
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(control);
    session.umount_and_join().context("unmounting the lazy filesystem")?;
    Ok(())
}

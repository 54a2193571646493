//! Desired state: which apps are installed and what they should be doing, in one versioned
//! file written atomically, so a kill -9 at any instant leaves the old or the new state.
//!
//! `state.json` is the current state and `state.json.prev` a second copy, written after it:
//! the same generation, or the one before if the agent died between the two writes. A file
//! that cannot be read or parsed is moved aside (never deleted, never over another one) and
//! the copy used. Whatever the state has lost, the reconciler adopts the containers and unit
//! files of this store that it does not know (`reconcile`): a missing entry never removes
//! anything.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{atomic, failpoint};

pub const STATE_FILE: &str = "state.json";
pub const PREVIOUS_FILE: &str = "state.json.prev";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
    /// Being uninstalled: removed from the state once its container and unit are gone.
    Absent,
}

impl Desired {
    pub const ALL: [Desired; 3] = [Desired::Running, Desired::Stopped, Desired::Absent];

    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
            Desired::Absent => "absent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppState {
    pub desired: Desired,
    /// With `Absent`: delete the app's data and secrets too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
    /// One restart was asked for and has not been done yet (at least once: a crash after
    /// the restart and before this flag is cleared restarts the app again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
    /// The state's generation when this entry was last changed: an action planned for one
    /// request (forget, purge, restart done) applies only while the entry is still at it.
    #[serde(default)]
    pub generation: u64,
}

impl AppState {
    pub fn new(desired: Desired) -> AppState {
        AppState { desired, purge: false, restart: false, generation: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Bumped by every write; shows in `node.status`.
    pub generation: u64,
    pub apps: BTreeMap<String, AppState>,
}

impl Default for State {
    fn default() -> State {
        State { version: VERSION, generation: 0, apps: BTreeMap::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Write(#[from] atomic::Error),
    #[error("{path}: cannot create the state directory: {source}")]
    Dir { path: PathBuf, source: io::Error },
}

/// How the state was recovered at start-up, for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// `corrupt`, `unreadable` or `missing`.
    pub reason: &'static str,
    /// Where the bad file was moved, if there was one.
    pub moved_to: Option<PathBuf>,
    /// Whether the previous good copy was used; if not, adopt from observed containers.
    pub from_previous: bool,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: State,
}

enum Read {
    Valid(State),
    Missing,
    Bad(&'static str),
}

fn read(path: &Path) -> Read {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<State>(&bytes) {
            Ok(s) if s.version == VERSION => Read::Valid(s),
            _ => Read::Bad("corrupt"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Read::Missing,
        Err(_) => Read::Bad("unreadable"),
    }
}

/// The highest generation any state file in `dir` still shows (`"generation": N`), damaged
/// or moved aside ones included, so that a recovered state never counts from below it:
/// clients compare generations.
fn legible_generation(dir: &Path) -> u64 {
    let files = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let named = files.filter(|e| e.file_name().to_string_lossy().starts_with(STATE_FILE));
    let text: String = named
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    text.split("\"generation\"")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest
                .trim_start_matches(|c: char| c == ':' || c.is_whitespace())
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Moves a bad file aside under a name no other file has: `state.json.corrupt-<secs>[-n]`.
fn move_aside(dir: &Path, name: &str, reason: &str) -> Option<PathBuf> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let from = dir.join(name);
    (0..1000)
        .find_map(|n| {
            let suffix = if n == 0 { String::new() } else { format!("-{n}") };
            let aside = dir.join(format!("{name}.{reason}-{stamp}{suffix}"));
            // A hard link never replaces an existing file, unlike a rename.
            match std::fs::hard_link(&from, &aside) {
                Ok(()) => Some(std::fs::remove_file(&from).map(|()| aside)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            }
        })?
        .ok()
}

impl Store {
    /// Opens the state in `dir`, recovering from whatever it finds. Fails only when `dir`
    /// itself cannot be created.
    pub fn open(dir: &Path) -> Result<(Store, Option<Recovery>), Error> {
        create_dir(dir)?;
        // Temp files of a writer killed between create and rename: never the state.
        let _ = atomic::remove_stale_temps(dir);
        let (reason, moved_to) = match read(&dir.join(STATE_FILE)) {
            Read::Valid(state) => {
                // A damaged second copy is moved aside now, not found when it is needed.
                if let Read::Bad(reason) = read(&dir.join(PREVIOUS_FILE)) {
                    let moved = move_aside(dir, PREVIOUS_FILE, reason);
                    tracing::warn!(?moved, reason, "the state's second copy was damaged; rewriting it");
                    let _ = atomic::write(dir, PREVIOUS_FILE, &to_bytes(&state), 0o600, atomic::Kind::State);
                }
                return Ok((Store { dir: dir.into(), state }, None));
            }
            Read::Missing => ("missing", None),
            // If the move fails, the bad file stays and is replaced by the next write; the
            // recovery is logged either way.
            Read::Bad(reason) => (reason, move_aside(dir, STATE_FILE, reason)),
        };
        let (mut state, from_previous) = match read(&dir.join(PREVIOUS_FILE)) {
            Read::Valid(state) => (state, true),
            Read::Bad(why) => {
                move_aside(dir, PREVIOUS_FILE, why);
                (State::default(), false)
            }
            Read::Missing => (State::default(), false),
        };
        // The generation never goes backwards: past what any damaged file still shows.
        let floor = legible_generation(dir);
        state.generation = state.generation.max(floor);
        let mut store = Store { dir: dir.into(), state };
        if from_previous || floor > 0 {
            // On a read-only or full data root this waits for the next write: the agent
            // still starts, and adopts what it finds.
            if let Err(e) = store.write_current() {
                tracing::warn!(error = %e, "cannot rewrite the recovered state yet");
            }
        }
        // A first start looks like a lost state; only a bad file or a used copy counts as a
        // recovery. Either way the reconciler adopts what it finds of this store.
        let recovery =
            (reason != "missing" || from_previous).then_some(Recovery { reason, moved_to, from_previous });
        Ok((store, recovery))
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Applies `f` and persists the result to `state.json`, then to its copy, each
    /// atomically. Every entry `f` changed is stamped with the new generation. On error
    /// nothing changes in memory.
    pub fn update<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> Result<R, Error> {
        self.write(None, f)
    }

    /// [`Store::update`] for a request about `app`: its entry takes the new generation even
    /// if nothing else in it changed (a second restart asked while the first is under way is
    /// a new request, not the same one).
    pub fn request<R>(&mut self, app: &str, f: impl FnOnce(&mut State) -> R) -> Result<R, Error> {
        self.write(Some(app), f)
    }

    fn write<R>(&mut self, request: Option<&str>, f: impl FnOnce(&mut State) -> R) -> Result<R, Error> {
        let mut next = self.state.clone();
        let r = f(&mut next);
        let generation = self.state.generation + 1;
        let mut changed = false;
        for (app, a) in next.apps.iter_mut() {
            let old = self.state.apps.get(app);
            a.generation = match old {
                Some(old)
                    if request != Some(app.as_str())
                        && AppState { generation: old.generation, ..a.clone() } == *old =>
                {
                    old.generation
                }
                _ => {
                    changed = true;
                    generation
                }
            };
        }
        if !changed && next.apps.len() == self.state.apps.len() {
            return Ok(r); // nothing to write: a converged node writes nothing
        }
        next.generation = generation;
        let bytes = to_bytes(&next);
        if failpoint::broken("non-atomic-state") {
            // The platform's bug: truncated in place, then written; a kill in between
            // leaves an empty file.
            use std::io::Write;
            let path = self.dir.join(STATE_FILE);
            let err = |op, source| atomic::Error { path: path.clone(), op, source };
            let mut f = std::fs::File::create(&path).map_err(|e| err("truncate", e))?;
            failpoint::hit(&self.dir, "state_write");
            f.write_all(&bytes).map_err(|e| err("write", e))?;
        } else {
            failpoint::hit(&self.dir, "state_write");
            atomic::write(&self.dir, STATE_FILE, &bytes, 0o600, atomic::Kind::State)?;
        }
        self.state = next;
        atomic::write(&self.dir, PREVIOUS_FILE, &bytes, 0o600, atomic::Kind::State)?;
        Ok(r)
    }

    fn write_current(&mut self) -> Result<(), Error> {
        Ok(atomic::write(&self.dir, STATE_FILE, &to_bytes(&self.state), 0o600, atomic::Kind::State)?)
    }
}

/// Creates the state directory (0700) and makes its entry in the parent durable.
fn create_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let err = |source| Error::Dir { path: dir.into(), source };
    if let Ok(meta) = std::fs::metadata(dir) {
        // The data root is the service user's alone; a shared directory (sticky, like /tmp)
        // or one of another user is left as it is, with a warning.
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            if meta.uid() == nix::unistd::geteuid().as_raw() && mode & 0o1000 == 0 {
                let done = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), ?done, "the data root was open to other users; making it 0700");
            } else {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the data root is open to other users and not ours to change");
            }
        }
        return Ok(());
    }
    crate::atomic::create_dir_all(dir, 0o700).map_err(|e| err(e.source))
}

fn to_bytes(s: &State) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(s).expect("state serializes");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(store: &mut Store, app: &str) {
        store.request(app, |s| s.apps.insert(app.into(), AppState::new(Desired::Running))).unwrap();
    }

    fn asides(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("corrupt"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_damaged_second_copy_is_moved_aside_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path()).unwrap();
        installed(&mut store, "fx-web");
        std::fs::write(dir.path().join(PREVIOUS_FILE), "{garbage").unwrap();
        let (store, recovery) = Store::open(dir.path()).unwrap();
        assert_eq!(recovery, None, "state.json was good");
        assert_eq!(asides(dir.path()).len(), 1, "{:?}", asides(dir.path()));
        let Read::Valid(copy) = read(&dir.path().join(PREVIOUS_FILE)) else { panic!("copy not rewritten") };
        assert_eq!(&copy, store.state());
    }

    #[test]
    fn the_generation_never_goes_backwards_after_both_files_are_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path()).unwrap();
        for app in ["a", "b", "c"] {
            installed(&mut store, app);
        }
        assert_eq!(store.state().generation, 3);
        // Truncated mid-write: the generation is still legible, the JSON is not.
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        std::fs::write(dir.path().join(STATE_FILE), &text[..text.len() / 2]).unwrap();
        std::fs::write(dir.path().join(PREVIOUS_FILE), "").unwrap();
        let (mut store, recovery) = Store::open(dir.path()).unwrap();
        assert!(recovery.is_some_and(|r| !r.from_previous));
        assert!(store.state().apps.is_empty());
        installed(&mut store, "d");
        assert_eq!(store.state().generation, 4, "counts on from the damaged file's generation");
    }

    #[test]
    fn files_moved_aside_never_overwrite_each_other() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..3 {
            std::fs::write(dir.path().join(STATE_FILE), format!("bad {n}")).unwrap();
            Store::open(dir.path()).unwrap();
        }
        let kept: Vec<String> =
            asides(dir.path()).iter().map(|n| std::fs::read_to_string(dir.path().join(n)).unwrap()).collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        for n in 0..3 {
            assert!(kept.contains(&format!("bad {n}")), "{kept:?}");
        }
    }

    #[test]
    fn stale_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".state.json.123.deadbeef.tmp");
        std::fs::write(&stale, "half").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn every_request_takes_a_new_generation_and_unchanged_entries_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path()).unwrap();
        installed(&mut store, "a");
        installed(&mut store, "b");
        assert_eq!(store.state().apps["a"].generation, 1);
        assert_eq!(store.state().apps["b"].generation, 2);
        // The same request again is a new request: a restart asked twice restarts twice.
        installed(&mut store, "a");
        assert_eq!(store.state().apps["a"].generation, 3);
        // An update that changes nothing writes nothing.
        store.update(|s| s.apps.insert("b".into(), AppState::new(Desired::Running))).unwrap();
        assert_eq!(store.state().generation, 3);
    }
}

//! Desired state: which apps are installed and what they should be doing, in one versioned
//! file written atomically, so a kill -9 at any instant leaves the old or the new state.
//!
//! `state.json` is the current state and `state.json.prev` a second copy, written after it:
//! the same generation, or the one before if the agent died between the two writes. A file
//! that cannot be read or parsed is moved aside (never deleted) and the copy used. After any
//! recovery the reconciler also adopts running containers the recovered state does not know
//! ([`Store::needs_adoption`]): an uncertain state never removes a container.

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
}

impl AppState {
    pub fn new(desired: Desired) -> AppState {
        AppState { desired, purge: false, restart: false }
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
    /// No valid state was found: the first tick adopts the containers it observes.
    pub needs_adoption: bool,
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

impl Store {
    /// Opens the state in `dir`, recovering from whatever it finds. Fails only when `dir`
    /// itself cannot be created.
    pub fn open(dir: &Path) -> Result<(Store, Option<Recovery>), Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir { path: dir.into(), source })?;
        let current = dir.join(STATE_FILE);
        let (reason, moved_to) = match read(&current) {
            Read::Valid(state) => return Ok((Store { dir: dir.into(), state, needs_adoption: false }, None)),
            Read::Missing => ("missing", None),
            Read::Bad(reason) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = dir.join(format!("{STATE_FILE}.{reason}-{stamp}"));
                // If even the rename fails, the bad file stays and is overwritten by the
                // next write; the recovery is logged either way.
                let moved = std::fs::rename(&current, &aside).is_ok().then_some(aside);
                (reason, moved)
            }
        };
        match read(&dir.join(PREVIOUS_FILE)) {
            Read::Valid(state) => {
                let mut store = Store { dir: dir.into(), state, needs_adoption: true };
                store.write_current()?;
                Ok((store, Some(Recovery { reason, moved_to, from_previous: true })))
            }
            // A first start looks like this too; only adoption tells them apart, so only a
            // bad file counts as a recovery here.
            _ => {
                let store = Store { dir: dir.into(), state: State::default(), needs_adoption: true };
                let recovery =
                    (reason != "missing").then_some(Recovery { reason, moved_to, from_previous: false });
                Ok((store, recovery))
            }
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Applies `f` and persists the result to `state.json`, then to its copy, each
    /// atomically. On error nothing changes in memory.
    pub fn update<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> Result<R, Error> {
        let mut next = self.state.clone();
        let r = f(&mut next);
        if next == self.state {
            return Ok(r); // nothing to write: a converged node writes nothing
        }
        next.generation = self.state.generation + 1;
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
            atomic::write(&self.dir, STATE_FILE, &bytes, 0o600)?;
        }
        self.state = next;
        atomic::write(&self.dir, PREVIOUS_FILE, &bytes, 0o600)?;
        self.needs_adoption = false;
        Ok(r)
    }

    fn write_current(&mut self) -> Result<(), Error> {
        Ok(atomic::write(&self.dir, STATE_FILE, &to_bytes(&self.state), 0o600)?)
    }
}

fn to_bytes(s: &State) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(s).expect("state serializes");
    v.push(b'\n');
    v
}

//! Nodes the runner can really hurt: a local node-in-a-box ([`local::LocalNode`]) or a real
//! host over SSH ([`ssh::SshNode`]). The engine sees only the [`Node`] trait: the fault
//! primitives, a command runner, and the node's files under its root (`data/`, the agent's
//! data root, and `catalog/`, the catalog its agent runs). The node, not the engine, knows
//! where those files live and how to reach them.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Result};
use archy_agent::manifest::Catalog;
use serde::{Deserialize, Serialize};

use crate::agent_client::AgentClient;
pub use crate::evidence::Evidence;

pub mod local;
pub mod provision;
pub mod ssh;

pub use local::LocalNode;

/// The fault primitives, the command runner and the file access every node offers.
pub trait Node: Send + Sync {
    /// Short name, for logs and report sections.
    fn name(&self) -> &str;
    /// How `--node` names this node: `local:NAME` or `ssh://user@host[:port]`.
    fn url(&self) -> String;
    /// The agent's API address as the runner reaches it.
    fn api_addr(&self) -> String;
    /// The agent's API token (read from the node; the agent client keeps it).
    fn token(&self) -> Result<String>;

    /// Brings the node up (a real host comes back by itself) and waits for the agent's /readyz.
    fn boot(&self) -> Result<Duration>;
    /// Every process dies at once, nothing is flushed; the node then boots again.
    fn power_cut(&self) -> Result<Evidence>;
    /// A power cut, then a boot: the cut's evidence, and the time from power on (the start of
    /// the boot) to the agent's /readyz answering.
    fn power_cycle(&self) -> Result<(Evidence, Duration)> {
        let e = self.power_cut()?;
        Ok((e, self.boot()?))
    }
    /// A clean stop of everything, then the node boots again.
    fn graceful_reboot(&self) -> Result<Evidence>;
    fn kill_agent(&self, signal: &str) -> Result<Evidence>;
    /// A restart through the user manager, which kills the agent's whole cgroup.
    fn restart_agent(&self) -> Result<Evidence>;
    /// Kills an app's main process, as the OOM killer would.
    fn kill_container(&self, app: &str, signal: &str) -> Result<Evidence>;
    /// The kernel's OOM killer kills an app's main process: the app's container is held to a
    /// memory limit and made to grow past it. The evidence's `kind` says what ran:
    /// `kernel-oom` (it took effect only if the kernel's OOM-kill count for that memory cgroup
    /// went up and the main process died), or `sigkill-stand-in` where the node offers no limit
    /// the runner can enforce ([`Node::oom_stand_in`], with the reason).
    fn oom_kill(&self, app: &str) -> Result<Evidence>;
    /// What `oom_kill` falls back to: SIGKILL to the app's main process, which is what an OOM
    /// kill leaves behind, and `why` no kernel OOM kill could be had.
    fn oom_stand_in(&self, app: &str, why: &str) -> Result<Evidence> {
        Ok(self.kill_container(app, "KILL")?.with("kind", OOM_STAND_IN).with("why_no_kernel_oom", why))
    }
    fn partition(&self) -> Result<Evidence>;
    fn heal(&self) -> Result<Evidence>;
    /// Runs a command on the node as the service user, in its environment.
    fn exec(&self, argv: &[&str]) -> Result<Output>;

    /// What a power cut keeps (the report's environment): `lazy`, `kernel` or `host`.
    fn durability(&self) -> &'static str;
    /// The node's root as the node itself names it (what the agent's config points at).
    fn root_on_node(&self) -> PathBuf;
    /// Uid of the service user on the node.
    fn service_uid(&self) -> Result<u32>;
    /// A file's bytes; `None` if it does not exist. Paths are relative to the node's root.
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>>;
    /// Creates or replaces a file (parents created), owned by the service user.
    fn write(&self, rel: &str, bytes: &[u8]) -> Result<()>;
    /// lstat; `None` if nothing is there.
    fn stat(&self, rel: &str) -> Result<Option<Stat>>;
    /// SHA-256 of a file's bytes, hex; `None` if it does not exist.
    fn hash(&self, rel: &str) -> Result<Option<String>>;
    /// Names in a directory, sorted; empty if it does not exist.
    fn list(&self, rel: &str) -> Result<Vec<String>>;
    /// Removes a file or a whole directory; whether anything was there.
    fn remove(&self, rel: &str) -> Result<bool>;
    /// Damages a file that exists (every fault but delete, which is [`Node::remove`]).
    fn damage(&self, rel: &str, fault: FileFault) -> Result<()>;
    /// The last `lines` lines of the node's log (its agent and units).
    fn log(&self, lines: usize) -> Result<String>;
    /// The catalog the node's agent runs: its own copy under `catalog/`.
    fn catalog(&self) -> Result<Catalog>;
    /// Turns a fault of the disk under the agent's data root on or off; the evidence says
    /// whether the data root is then really full or read-only (or no longer).
    fn disk_fault(&self, fault: DiskFault, on: bool) -> Result<Evidence>;

    /// A file fault with its evidence: the file's checksum, owner and mode before and after.
    fn file_fault(&self, rel: &str, fault: FileFault) -> Result<Evidence> {
        // Checksums of files only: a fault may hit a whole directory (an app's data).
        let sha = |st: &Option<Stat>| match st {
            Some(s) if s.kind == FileKind::File => self.hash(rel),
            _ => Ok(None),
        };
        let before = self.stat(rel)?;
        ensure!(before.is_some(), "{rel} does not exist on node {}", self.name());
        let sha_before = sha(&before)?;
        match fault {
            FileFault::Delete => {
                self.remove(rel)?;
            }
            other => self.damage(rel, other)?,
        }
        let after = self.stat(rel)?;
        // A file made root's may be unreadable to the service user who reads it over SSH.
        let sha_after = sha(&after).unwrap_or_default();
        Ok(Evidence::default()
            .with("fault", format!("{fault:?}").to_lowercase())
            .with("path", rel)
            .with("sha256_before", &sha_before)
            .with("sha256_after", &sha_after)
            .with("owner_after", after.as_ref().map(|s| s.uid))
            .with("mode_after", after.as_ref().map(|s| format!("{:o}", s.mode)))
            .effect(after != before || sha_after != sha_before))
    }
}

/// What lstat says of a file on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub kind: FileKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub inode: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Quadlet,
    Podman,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Quadlet => "quadlet",
            Backend::Podman => "podman",
        }
    }
}

/// File faults, each a real change on the node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileFault {
    Delete,
    Truncate,
    /// Overwrite with random bytes of the same length (at least 16).
    Corrupt,
    /// chown root:root (as a misbehaving root process would).
    ChownRoot,
    /// chmod 0644.
    Chmod,
    /// Replaced by a symlink to /etc/hostname, as a planted link would be.
    Symlink,
    /// Replaced by an empty directory.
    Directory,
    /// Replaced by a FIFO: whoever opens it to read blocks until a writer comes.
    Fifo,
}

/// Faults of the filesystem under the agent's data root, each real for every process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFault {
    /// No free space left (ENOSPC).
    Full,
    /// Mounted read-only (EROFS).
    ReadOnly,
}

/// A path relative to a node's root, refused if it would leave it.
pub fn checked(rel: &str) -> Result<&str> {
    ensure!(
        !rel.is_empty() && !rel.starts_with('/') && !rel.split('/').any(|c| c == ".." || c == "."),
        "`{rel}` is not a path inside the node's root (relative, no `.` or `..`)"
    );
    Ok(rel)
}

/// A client of a node's agent (the token is read at its first request).
pub fn agent(node: &dyn Node) -> AgentClient<'_> {
    AgentClient::at(node.api_addr(), Box::new(move || node.token()))
}

/// `kind` of an `oom_kill` evidence: the kernel's OOM killer did it.
pub const OOM_KERNEL: &str = "kernel-oom";
/// `kind` of an `oom_kill` evidence: no memory limit could be enforced; SIGKILL stood in.
pub const OOM_STAND_IN: &str = "sigkill-stand-in";

/// While this file exists (under the node's root), the agent's podman fails. Beside the
/// podman wrapper, not on the data root: a full or read-only data root must not keep podman
/// failing after the fault is turned off (explore seed 401).
pub const PODMAN_FAIL_FLAG: &str = "bin/podman-fail";

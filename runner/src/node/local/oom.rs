//! A real OOM kill on a local node: the kernel's OOM killer kills the app, not a signal of the
//! runner. The app's container is held to a memory limit and processes exec'd into it grow
//! past it. Where the limit lives depends on the host:
//! - cgroup v2 with the memory controller at the container's cgroup: its `memory.max`,
//!   lowered to what it uses plus a margin and restored after; the count is `memory.events`'
//!   `oom_kill`.
//! - a cgroup v1 memory hierarchy (hybrid hosts, such as the testbed): a child of the
//!   container's memory cgroup made for the fault, with `memory.limit_in_bytes`, into which the
//!   runner (root) moves the container's processes; the count is `memory.oom_control`'s
//!   `oom_kill`. A v1 child only counts its own kills: nothing else can move the count.
//!
//! Neither: [`Node::oom_stand_in`], with the reason.
//!
//! The kernel kills the process of the cgroup with the highest badness (its memory plus
//! `oom_score_adj` thousandths of the limit). The runner raises the main process's
//! `oom_score_adj` to 1000 (raising needs no privilege; lowering the growers' would need
//! CAP_SYS_RESOURCE, which the testbed's root lacks) and spreads the growth over four
//! processes, so none of them outweighs it (with one grower, the kernel chose the grower: its
//! memory is the whole limit and more, the main process's score a truncated 1000/1000 of it).
//! The main process is then the victim, as when the app itself grows, and the container's PID
//! namespace dies with it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{cgroup2_root, LocalNode};
use crate::node::{Evidence, Node, OOM_KERNEL};

/// The v1 limit: the child cgroup starts empty (charges stay where they were made), so this
/// is what the growers may take before the kernel kills.
const V1_LIMIT: u64 = 32 << 20;
/// The v2 limit over what the container uses when the fault starts.
const V2_MARGIN: u64 = 32 << 20;
/// Where a cgroup v1 memory hierarchy is mounted.
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
/// Until the kernel's count goes up (the growers' own wait for the limit ends at 30 s too).
const KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Until the main process is gone once the kernel has killed.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Run by `sh -c` in the container, `$1` the text its /proc/self/cgroup shows once the
/// runner has put it under the limit (empty: it already is). It waits for that first, so
/// that not one page is charged outside the limit (tail reads /dev/zero at gigabytes a
/// second), then four `tail /dev/zero` (no newline ever comes, so each keeps all it read)
/// grow until the kernel kills.
const GROW: &str = r#"n=0
while :; do
  c=; while read -r l; do c="$c $l"; done < /proc/self/cgroup
  case "$c" in *"$1"*) break;; esac
  n=$((n+1)); [ $n -lt 600 ] || { echo "never put under the memory limit" >&2; exit 3; }
  sleep 0.05
done
if command -v tail >/dev/null; then t=tail; else t="busybox tail"; fi
for i in 1 2 3 4; do $t /dev/zero & done
wait"#;

/// The `oom_kill` count of a `memory.events` (v2) or `memory.oom_control` (v1) file: both are
/// `key value` lines. `None` if the file has no such line (v1 before Linux 4.13).
pub(super) fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == "oom_kill").then(|| f.next()?.parse().ok())?
    })
}

/// The `NSpid:` of a /proc/PID/status: the pid in each PID namespace, outermost first.
pub(super) fn nspid(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// From a /proc/PID/cgroup: the path in the v1 hierarchy holding the memory controller.
pub(super) fn v1_memory_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    })
}

/// From a /proc/PID/cgroup: the path in the unified (v2) hierarchy.
pub(super) fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing `{value}` to {}", path.display()))
}

fn count(path: &Path) -> Result<u64> {
    oom_kill_count(&read(path)?)
        .with_context(|| format!("{} counts no OOM kills (no oom_kill line)", path.display()))
}

fn pid_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Moves `pids` into the cgroup `dir` (v1); a process that has exited meanwhile (the kernel
/// has just killed the container) is no error.
fn move_into(dir: &Path, pids: &[u32]) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    for pid in pids {
        match std::fs::write(&procs, pid.to_string()) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) || pid_ns(*pid).is_none() => {}
            r => r.with_context(|| format!("moving pid {pid} into {}", dir.display()))?,
        }
    }
    Ok(())
}

/// Takes a v1 cgroup of ours away: its processes back to `parent`, then the directory.
fn remove_v1(dir: &Path, parent: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        let left: Vec<u32> =
            read(&dir.join("cgroup.procs"))?.lines().filter_map(|l| l.trim().parse().ok()).collect();
        move_into(parent, &left)?;
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            // A process killed a moment ago may still be charged or listed.
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}

/// The memory limit the fault runs under.
enum Limit {
    /// The container's own cgroup, its `memory.max` (and `memory.swap.max`) lowered.
    V2 { dir: PathBuf, bytes: u64, max_before: String, swap_before: Option<String> },
    /// A child of the container's memory cgroup, made for the fault.
    V1 { dir: PathBuf, parent: PathBuf },
}

impl Limit {
    /// Sets a limit for the process `host_pid` (host pid) of the container, or says why none
    /// can be set.
    fn set(host_pid: u32, name: &str) -> Result<Limit> {
        let cgroups = read(Path::new(&format!("/proc/{host_pid}/cgroup")))?;
        let mut no_v2 = "the unified hierarchy holds no cgroup of the container".to_string();
        if let Some(path) = unified_path(&cgroups) {
            let dir = cgroup2_root().join(path.trim_start_matches('/'));
            if dir.join("memory.max").exists() {
                count(&dir.join("memory.events"))?;
                let current: u64 =
                    read(&dir.join("memory.current"))?.trim().parse().context("memory.current")?;
                let max_before = read(&dir.join("memory.max"))?.trim().to_string();
                let bytes = current + V2_MARGIN;
                // Swap first: with swap, the growers would be swapped out instead of killed.
                let swap = dir.join("memory.swap.max");
                let swap_before = match swap.exists() {
                    true => Some(read(&swap)?.trim().to_string()),
                    false => None,
                };
                if swap_before.is_some() {
                    write(&swap, "0")?;
                }
                let limit = Limit::V2 { dir: dir.clone(), bytes, max_before, swap_before };
                if let Err(e) = write(&dir.join("memory.max"), &bytes.to_string()) {
                    let _ = limit.undo();
                    return Err(e);
                }
                return Ok(limit);
            }
            no_v2 = format!("{} has no memory controller (no memory.max)", dir.display());
        }
        let Some(path) = v1_memory_path(&cgroups).filter(|_| Path::new(V1_MEMORY).is_dir()) else {
            bail!("no memory limit can be enforced: {no_v2}, and there is no cgroup v1 memory hierarchy")
        };
        let parent = Path::new(V1_MEMORY).join(path.trim_start_matches('/'));
        count(&parent.join("memory.oom_control"))?;
        let dir = parent.join(format!("archy-oom-{name}"));
        if dir.exists() {
            remove_v1(&dir, &parent).context("a cgroup left by an earlier OOM fault")?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        let limit = Limit::V1 { dir: dir.clone(), parent };
        let set = (|| {
            write(&dir.join("memory.limit_in_bytes"), &V1_LIMIT.to_string())?;
            // Memory plus swap too, where swap is accounted: swapping is not being killed.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &V1_LIMIT.to_string())?;
            }
            Ok(())
        })();
        if let Err(e) = set {
            let _ = limit.undo();
            return Err(e);
        }
        Ok(limit)
    }

    fn version(&self) -> &'static str {
        match self {
            Limit::V2 { .. } => "v2",
            Limit::V1 { .. } => "v1",
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Limit::V2 { dir, .. } | Limit::V1 { dir, .. } => dir,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Limit::V2 { bytes, .. } => *bytes,
            Limit::V1 { .. } => V1_LIMIT,
        }
    }

    /// The file with the kernel's OOM-kill count for the limited cgroup.
    fn counter(&self) -> PathBuf {
        match self {
            Limit::V2 { dir, .. } => dir.join("memory.events"),
            Limit::V1 { dir, .. } => dir.join("memory.oom_control"),
        }
    }

    /// What a process under the limit sees in its /proc/self/cgroup (the growers wait for it).
    fn marker(&self) -> String {
        match self {
            // runc exec puts the growers into the container's cgroup itself.
            Limit::V2 { .. } => String::new(),
            Limit::V1 { dir, .. } => {
                dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
        }
    }

    /// Puts these processes of the container under the limit.
    fn enter(&self, pids: &[u32]) -> Result<()> {
        match self {
            Limit::V2 { .. } => Ok(()),
            Limit::V1 { dir, .. } => move_into(dir, pids),
        }
    }

    /// Takes the limit away (the container may be gone, and its cgroup with it).
    fn undo(&self) -> Result<()> {
        match self {
            Limit::V2 { dir, max_before, swap_before, .. } => {
                if dir.is_dir() {
                    write(&dir.join("memory.max"), max_before)?;
                    if let Some(swap) = swap_before {
                        write(&dir.join("memory.swap.max"), swap)?;
                    }
                }
                Ok(())
            }
            Limit::V1 { dir, parent } => remove_v1(dir, parent),
        }
    }
}

impl LocalNode {
    /// The kernel OOM-kills `app`'s main process (module docs); the stand-in where this host
    /// lets the runner enforce no memory limit.
    pub fn oom_kill(&self, app: &str) -> Result<Evidence> {
        let pid = self.container_pid(app)?;
        let host = self.host_pid(pid)?;
        let limit = match Limit::set(host, &format!("{}-{app}", self.spec.name)) {
            Ok(l) => l,
            Err(why) => return self.oom_stand_in(app, &format!("{why:#}")),
        };
        let grown = self.grow(app, &limit, host);
        let undone = limit.undo().context("taking the OOM fault's memory limit away");
        let e = grown?;
        undone?;
        Ok(e.with("app", app).with("pid", pid))
    }

    /// The host pid of the process that is `node_pid` in the node's PID namespace.
    fn host_pid(&self, node_pid: i32) -> Result<u32> {
        let node_pid = u32::try_from(node_pid).context("a negative pid")?;
        self.processes()
            .into_iter()
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .ok()
                    .and_then(|s| nspid(&s))
                    .is_some_and(|ns| ns.get(1) == Some(&node_pid))
            })
            .with_context(|| format!("node `{}`: no process is pid {node_pid} in the node", self.spec.name))
    }

    /// Host pids of the node's processes in the PID namespace `ns` (a container's).
    fn members(&self, ns: &Path) -> Vec<u32> {
        self.processes().into_iter().filter(|p| pid_ns(*p).as_deref() == Some(ns)).collect()
    }

    /// The growers under `limit` until the kernel kills, then what is left of them gone.
    fn grow(&self, app: &str, limit: &Limit, host: u32) -> Result<Evidence> {
        let ns =
            pid_ns(host).with_context(|| format!("`{app}`: its main process (host pid {host}) is gone"))?;
        let alive = || pid_ns(host).as_deref() == Some(&*ns);
        let before = count(&limit.counter())?;
        let adj = PathBuf::from(format!("/proc/{host}/oom_score_adj"));
        let adj_before = read(&adj)?.trim().to_string();
        write(&adj, "1000")?;
        let app_pids = self.members(&ns);
        let mut client = None;
        let ran = (|| -> Result<Evidence> {
            limit.enter(&app_pids)?;
            let start = Instant::now();
            let marker = limit.marker();
            let container = format!("archy-{app}");
            let mut cmd = self.command(&["podman", "exec", &container, "sh", "-c", GROW, "grow", &marker])?;
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let child = client.insert(crate::exec::spawn(&mut cmd)?);
            let mut after = before;
            let mut ended = None;
            while start.elapsed() < KILL_TIMEOUT {
                crate::interrupt::check()?;
                // A v2 container's cgroup goes with it: the last count read stands.
                after = count(&limit.counter()).unwrap_or(after);
                if after > before {
                    break;
                }
                // Every process of the container, the growers as they appear (they wait).
                limit.enter(&self.members(&ns))?;
                if let Some(status) = child.try_wait()? {
                    ended = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let kill_seconds = start.elapsed().as_secs_f64();
            let gone = Instant::now();
            while alive() && after > before && gone.elapsed() < GONE_TIMEOUT {
                std::thread::sleep(Duration::from_millis(20));
            }
            let killed = !alive();
            let mut e = Evidence::of(json!({
                "fault": "oom_kill",
                "kind": OOM_KERNEL,
                "cgroup_version": limit.version(),
                "memory_cgroup": limit.dir(),
                "limit_bytes": limit.bytes(),
                "oom_kill_before": before,
                "oom_kill_after": after,
                "main_process_killed": killed,
                "kill_seconds": kill_seconds,
            }))
            .effect(after > before && killed);
            if let Some(status) = ended {
                e = e.with("growers_ended", status.to_string());
            }
            Ok(e)
        })();
        // Whatever happened: the runner's growers gone, the main process's score as it was.
        if alive() {
            for p in self.members(&ns).into_iter().filter(|p| !app_pids.contains(p)) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::SIGKILL);
            }
            let _ = write(&adj, &adj_before);
        }
        let stderr = client.map(|c| finish(c, GONE_TIMEOUT)).unwrap_or_default();
        let e = ran?;
        Ok(if e.took_effect == Some(false) && !stderr.is_empty() {
            e.with("growers_stderr", stderr)
        } else {
            e
        })
    }
}

/// Waits (bounded) for the `podman exec` client to end once its growers are gone: its stderr.
fn finish(mut child: std::process::Child, timeout: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(_)) = child.try_wait() {
            let mut text = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut text);
            }
            return text.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ours, by its pid: nsenter (the growers were killed above, so podman ends too).
    let _ = child.kill();
    let _ = child.wait();
    "the podman exec client did not end; killed".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counts_of_v1_and_v2_files() {
        // memory.oom_control, v1 (Linux >= 4.13)
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"), Some(3));
        // memory.events, v2
        assert_eq!(oom_kill_count("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"), Some(1));
        // An older v1 kernel counts no kills; garbage is no count, never a panic.
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert_eq!(oom_kill_count("oom_kill\noom_kill x\n"), None);
        assert_eq!(oom_kill_count(""), None);
    }

    #[test]
    fn proc_files_of_a_container_process() {
        let status = "Name:\tsh\nTgid:\t17598\nNSpid:\t17598\t162\t1\nNSsid:\t1\n";
        assert_eq!(nspid(status), Some(vec![17598, 162, 1]));
        assert_eq!(nspid("Name:\tsh\n"), None);
        assert_eq!(nspid("NSpid:\t12\tx\n"), None);
        let cgroup =
            "9:name=systemd:/\n4:memory:/process_api/c0e1\n3:cpuset:/\n0::/archy-chaos/n1/app.slice\n";
        assert_eq!(v1_memory_path(cgroup), Some("/process_api/c0e1"));
        assert_eq!(unified_path(cgroup), Some("/archy-chaos/n1/app.slice"));
        // Co-mounted controllers, and a pure v2 host.
        assert_eq!(v1_memory_path("5:memory,hugetlb:/a:b\n"), Some("/a:b"));
        assert_eq!(v1_memory_path("0::/user.slice\n"), None);
        assert_eq!(unified_path("4:memory:/\n"), None);
    }
}

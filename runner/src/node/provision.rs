//! `node provision`: installs the agent on a host over SSH as a deployment would, as a user
//! service of the login user (the service user), and `node deprovision` removes it all. The
//! host needs podman and systemd's user manager, nothing of this source tree. Idempotent:
//! files are compared by checksum first, and a second run changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sha2::Digest;

use super::local::{agent_unit, podman_cgroup, podman_wrapper};
use super::ssh::{quote, SshNode};
use super::{Backend, Node};

pub struct Options {
    /// The agent binary to install (the one beside archy-chaos).
    pub agent: PathBuf,
    pub catalog: PathBuf,
    /// Import the fixture image if the host lacks it.
    pub fixtures: bool,
}

const UNIT: &str = ".config/systemd/user/archy-agent.service";
const CONFIG: &str = ".config/archy/agent.yml";
const QUADLET_DIR: &str = ".config/containers/systemd";
const FIXTURE_IMAGE: &str = "localhost/archy-fixture:1";
const FIXTURE_ROOTFS: &str = "/var/lib/archy-chaos/fixture-rootfs.tar";
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// `sha256sum` lines (`HASH  ./rel`) of every file under `dir`, as the host prints them.
fn local_sums(dir: &Path) -> Result<BTreeSet<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            if path.is_dir() {
                walk(base, &path, out)?;
            } else {
                let rel = path.strip_prefix(base)?.display().to_string();
                out.insert(format!("{}  ./{rel}", sha(&std::fs::read(&path)?)));
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

pub fn provision(node: &SshNode, opts: &Options) -> Result<()> {
    let host = node.host();
    ensure!(
        opts.agent.is_file(),
        "{} not found: the agent is built beside archy-chaos (`cargo build --release` builds both)",
        opts.agent.display()
    );
    archy_agent::manifest::Catalog::load(&opts.catalog)
        .map_err(|e| anyhow::anyhow!("{}: not a valid catalog: {e}", opts.catalog.display()))?;
    let (root, home) = (node.root()?, node.home()?);
    println!("{host}: root {}, podman {}", root.display(), node.podman()?);
    let mut changes = install(node, opts, &root, &home)?;
    node.run_ok(&format!("mkdir -p {}", quote(&home.join(QUADLET_DIR).to_string_lossy())))?;
    changes += linger(node)?;
    changes += start(node, changes)?;
    if opts.fixtures {
        changes += import_fixture(node)?;
    }
    doctor(node, &root, &home)?;
    let (calls, took) = node.calls();
    if changes == 0 {
        println!("{host}: already provisioned; nothing changed ({calls} ssh commands in {took:.1?})");
    } else {
        println!("{host}: provisioned, {changes} change(s) ({calls} ssh commands in {took:.1?})");
    }
    Ok(())
}

/// The agent, its podman wrapper, config, unit and the catalog, each written only when its
/// checksum or mode differs; how many changed.
fn install(node: &SshNode, opts: &Options, root: &Path, home: &Path) -> Result<u32> {
    let host = node.host();
    let mut changes = 0;
    let config = format!(
        "data_root: {root}/data\ncatalog: {root}/catalog\nlisten: \"{listen}\"\ntick_interval: 5s\nbackend: quadlet\nquadlet_dir: {home}/{QUADLET_DIR}\npodman: {root}/bin/podman\n",
        root = root.display(),
        home = home.display(),
        listen = node.listen,
    );
    let files: Vec<(PathBuf, Vec<u8>, u32)> = vec![
        (root.join("bin/archy-agent"), std::fs::read(&opts.agent)?, 0o755),
        (root.join("bin/podman"), podman_wrapper(root, &node.podman()?).into_bytes(), 0o755),
        (home.join(CONFIG), config.into_bytes(), 0o644),
        (
            home.join(UNIT),
            agent_unit(&root.join("bin/archy-agent"), &home.join(CONFIG), "").into_bytes(),
            0o644,
        ),
    ];
    let paths: Vec<String> = files.iter().map(|(p, ..)| quote(&p.to_string_lossy())).collect();
    // Missing files just have no line; their mode is part of what is compared.
    let out = node.run(&format!(
        "sha256sum -- {} 2>/dev/null; stat -c '%a %n' -- {} 2>/dev/null; true",
        paths.join(" "),
        paths.join(" ")
    ))?;
    let remote = String::from_utf8_lossy(&out.stdout).into_owned();
    for (path, bytes, mode) in &files {
        let p = path.display();
        if remote.lines().any(|l| l == format!("{}  {p}", sha(bytes)))
            && remote.lines().any(|l| l == format!("{mode:o} {p}"))
        {
            continue;
        }
        node.put(path, bytes, Some(*mode))?;
        println!("{host}: wrote {p}");
        changes += 1;
    }

    let catalog = root.join("catalog");
    let q = quote(&catalog.to_string_lossy());
    let out = node.run(&format!("cd {q} 2>/dev/null && find . -type f -exec sha256sum -- {{}} +"))?;
    let remote: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    if remote != local_sums(&opts.catalog)? {
        let tar = crate::exec::output(
            std::process::Command::new("tar").arg("-C").arg(&opts.catalog).args(["-cf", "-", "."]),
        )?;
        ensure!(
            tar.status.success(),
            "packing {}: {}",
            opts.catalog.display(),
            String::from_utf8_lossy(&tar.stderr)
        );
        // Unpacked beside, then swapped: the agent never reads half a catalog.
        let script = format!(
            "set -e; rm -rf {q}.new; mkdir -p {q}.new; tar -xf - -C {q}.new; rm -rf {q}; mv {q}.new {q}"
        );
        let out = node.run_with(&script, Some(&tar.stdout), TRANSFER_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "{host}: installing the catalog: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        println!("{host}: installed the catalog {} at {}", opts.catalog.display(), catalog.display());
        changes += 1;
    }
    Ok(changes)
}

/// Lingering: the user manager (and so the agent) starts at boot, not at a login.
fn linger(node: &SshNode) -> Result<u32> {
    let host = node.host();
    let mut changes = 0;
    let linger = node.run("loginctl show-user -p Linger --value \"$(id -un)\"")?;
    match String::from_utf8_lossy(&linger.stdout).trim() {
        "yes" => {}
        "no" => {
            node.run_ok("loginctl enable-linger")?;
            println!("{host}: enabled lingering for the login user");
            changes += 1;
        }
        _ => println!(
            "{host}: note: no logind answers on the host ({}): the user manager, and so the agent, \
             runs only while the user has a session; run `loginctl enable-linger USER` once it does",
            String::from_utf8_lossy(&linger.stderr).trim()
        ),
    }

    Ok(changes)
}

/// The agent's unit enabled and (re)started when anything changed, then ready.
fn start(node: &SshNode, changed: u32) -> Result<u32> {
    let host = node.host();
    let mut changes = 0;
    let unit = "archy-agent.service";
    if changed > 0 {
        node.run_ok(&format!(
            "systemctl --user daemon-reload && systemctl --user enable {unit} && systemctl --user restart {unit}"
        ))?;
        println!("{host}: (re)started {unit}");
    } else if !node
        .run(&format!(
            "systemctl --user is-enabled --quiet {unit} && systemctl --user is-active --quiet {unit}"
        ))?
        .status
        .success()
    {
        node.run_ok(&format!("systemctl --user enable --now {unit}"))?;
        println!("{host}: enabled and started {unit}");
        changes += 1;
    }
    let client = super::agent(node);
    let took = client.wait_ready(Duration::from_secs(60)).with_context(|| {
        format!("{host}: the agent did not get ready; its log:\n{}", node.log(30).unwrap_or_default())
    })?;
    println!("{host}: agent ready at {} (through the connection) after {took:?}", node.api_addr());

    Ok(changes)
}

/// The fixture image, from this machine's root filesystem tar, if the host lacks it.
fn import_fixture(node: &SshNode) -> Result<u32> {
    let host = node.host();
    let mut changes = 0;
    if !node.exec(&["podman", "image", "exists", FIXTURE_IMAGE])?.status.success() {
        let rootfs = std::fs::read(FIXTURE_ROOTFS)
            .with_context(|| format!("{FIXTURE_ROOTFS}: run scripts/setup-host on this machine"))?;
        let out =
            node.run_with(&format!("podman import -q - {FIXTURE_IMAGE}"), Some(&rootfs), TRANSFER_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "{host}: importing {FIXTURE_IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        println!("{host}: imported {FIXTURE_IMAGE}");
        changes += 1;
    }

    Ok(changes)
}

/// What `archy-agent doctor` finds on the host, with the fixes it proposes.
fn doctor(node: &SshNode, root: &Path, home: &Path) -> Result<()> {
    let host = node.host();
    let doctor = node.run(&format!(
        "{} doctor --config {}",
        quote(&root.join("bin/archy-agent").to_string_lossy()),
        quote(&home.join(CONFIG).to_string_lossy())
    ))?;
    let table = String::from_utf8_lossy(&doctor.stdout);
    let problems: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("│ FAIL") || l.contains("│ warn") || l.contains("failed:"))
        .collect();
    if problems.is_empty() && doctor.status.success() {
        println!("{host}: doctor: every check passes");
    } else {
        println!("{host}: doctor found problems (check, found, fix):");
        for p in problems {
            println!("  {p}");
        }
        eprint!("{}", String::from_utf8_lossy(&doctor.stderr));
    }
    Ok(())
}

pub fn deprovision(node: &SshNode) -> Result<()> {
    let host = node.host();
    let (root, home) = (node.root()?, node.home()?);
    // Units the agent wrote carry its header: those, and only those, go with it.
    let script = format!(
        "systemctl --user disable --now archy-agent.service 2>/dev/null && echo 'stopped and disabled archy-agent.service'
for f in {quadlet}/*.container; do
  [ -f \"$f\" ] && grep -qxF {header} \"$f\" || continue
  u=$(basename \"$f\" .container).service
  systemctl --user stop \"$u\" 2>/dev/null; rm -f -- \"$f\" && echo \"removed $f\"
done
for f in {unit} {config}; do [ -e \"$f\" ] && rm -f -- \"$f\" && echo \"removed $f\"; done
rmdir {config_dir} 2>/dev/null
systemctl --user daemon-reload 2>/dev/null
ids=$(podman ps -aq --filter label=io.archy.app) && [ -n \"$ids\" ] && podman rm -f -t 0 $ids >/dev/null && echo \"removed containers $(echo $ids)\"
[ -e {root} ] && rm -rf -- {root} && echo removed {root}
true",
        quadlet = quote(&home.join(QUADLET_DIR).to_string_lossy()),
        header = quote(archy_agent::quadlet::HEADER),
        unit = quote(&home.join(UNIT).to_string_lossy()),
        config = quote(&home.join(CONFIG).to_string_lossy()),
        config_dir = quote(&home.join(".config/archy").to_string_lossy()),
        root = quote(&root.to_string_lossy()),
    );
    let out = node.run_with(&script, None, TRANSFER_TIMEOUT)?;
    ensure!(out.status.success(), "{host}: deprovisioning: {}", String::from_utf8_lossy(&out.stderr).trim());
    let done = String::from_utf8_lossy(&out.stdout);
    for l in done.lines() {
        println!("{host}: {l}");
    }
    if done.trim().is_empty() {
        println!("{host}: nothing to remove");
    }
    Ok(())
}

/// The host's agent put on another backend for a while (see [`switch_backend`]).
pub struct Switched {
    path: PathBuf,
    config: String,
}

/// Puts the host's agent on `backend`, if it is not on it, by the config `provision` wrote:
/// its `backend:` line and, for the podman backend, a cgroup of the user's own for podman's
/// calls (else an agent restart takes every container with it, the platform's FM3); then
/// restarts it. The caller removes every app first: an app one backend started is not the
/// other's to adopt, so apps still installed (`kept`, the protected ones) refuse a switch.
pub fn switch_backend(node: &SshNode, backend: Backend, kept: &[String]) -> Result<Option<Switched>> {
    let path = node.home()?.join(CONFIG);
    let config = node.run_ok(&format!("cat -- {}", quote(&path.to_string_lossy())))?;
    let line = format!("backend: {}", backend.name());
    if config.lines().any(|l| l.trim_end() == line) {
        return Ok(None);
    }
    ensure!(
        kept.is_empty(),
        "the host's agent is not on the {} backend, and protected apps {kept:?} keep it from switching",
        backend.name()
    );
    let mut lines: Vec<String> = config
        .lines()
        .filter(|l| !l.starts_with("backend:") && !l.starts_with("podman_cgroup:"))
        .map(str::to_string)
        .collect();
    lines.push(line);
    if backend == Backend::Podman {
        let cgroup = podman_cgroup(node.run_ok("id -u")?.trim());
        node.run_ok(&format!("mkdir -p {0} && test -w {0}/cgroup.procs", quote(&cgroup))).with_context(
            || {
                format!(
                    "the podman backend needs a cgroup of the user's own at {cgroup} (cgroup v2, delegated)"
                )
            },
        )?;
        lines.push(format!("podman_cgroup: {cgroup}"));
    }
    let switched = Switched { path, config };
    switched.put(node, &format!("{}\n", lines.join("\n")))?;
    Ok(Some(switched))
}

impl Switched {
    /// The config as it was, and the agent restarted on it.
    pub fn restore(self, node: &SshNode) -> Result<()> {
        self.put(node, &self.config)
    }

    fn put(&self, node: &SshNode, config: &str) -> Result<()> {
        node.put(&self.path, config.as_bytes(), None)?;
        node.restart_agent()?;
        super::agent(node).wait_ready(Duration::from_secs(60))?;
        Ok(())
    }
}
